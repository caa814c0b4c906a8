//! Modbus RTU slave loop with fault injection ([`serve_rtu`]), written on raw
//! bytes so that replies can be delayed, corrupted, truncated or preceded by
//! garbage, plus optional wire-time emulation ([`LineTiming`]).

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_serial::SerialPortBuilderExt;
use tokio_util::sync::CancellationToken;

use super::device::{unit_map, Device, Op, Reply, EX_ILLEGAL_FUNCTION, EX_ILLEGAL_VALUE};

/// CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF). On the wire the low
/// byte goes first.
pub fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0xFFFF, |crc, &b| crc_update(crc, b))
}

fn crc_update(mut crc: u16, b: u8) -> u16 {
    crc ^= u16::from(b);
    for _ in 0..8 {
        crc = if crc & 1 != 0 {
            (crc >> 1) ^ 0xA001
        } else {
            crc >> 1
        };
    }
    crc
}

/// Length of the shortest prefix of `b` (at least 4 bytes, at most 256) that
/// ends in its own CRC.
fn crc_valid_prefix(b: &[u8]) -> Option<usize> {
    let mut crc = 0xFFFF;
    for (i, &byte) in b.iter().enumerate().take(254) {
        crc = crc_update(crc, byte);
        let [lo, hi] = crc.to_le_bytes();
        if i >= 1 && b.get(i + 1) == Some(&lo) && b.get(i + 2) == Some(&hi) {
            return Some(i + 3);
        }
    }
    None
}

/// Appends the CRC of `frame` to it (low byte first).
pub fn push_crc(frame: &mut Vec<u8>) {
    let crc = crc16(frame);
    frame.extend_from_slice(&crc.to_le_bytes());
}

/// Whether the last two bytes of `frame` are the CRC of the rest.
pub fn crc_ok(frame: &[u8]) -> bool {
    match frame.len().checked_sub(2) {
        Some(n) if n >= 2 => crc16(&frame[..n]).to_le_bytes() == [frame[n], frame[n + 1]],
        _ => false,
    }
}

/// Emulated serial line speed: replies take their wire time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTiming {
    /// Baud rate; one character is 10 bits (8N1).
    pub baud: u32,
}

impl LineTiming {
    /// Wire time of `chars` characters at this baud rate (10 bits each).
    pub fn wire_time(&self, chars: usize) -> Duration {
        let bits = chars as f64 * 10.0;
        Duration::from_secs_f64(bits / f64::from(self.baud.max(1)))
    }
}

/// Options of the RTU slave loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtuOptions {
    /// When set, before replying the loop sleeps the wire time of the request
    /// plus that of the reply, so that one transaction on a PTY takes as long as
    /// on a real line at that speed (plus `turnaround`).
    pub line: Option<LineTiming>,
    /// Extra processing time before each reply (added to the fault `delay`).
    pub turnaround: Duration,
    /// Bytes of an incomplete frame are dropped after this long without a new
    /// byte (lets the loop resynchronise after partial or garbage input).
    pub frame_timeout: Duration,
}

impl Default for RtuOptions {
    fn default() -> Self {
        Self {
            line: None,
            turnaround: Duration::ZERO,
            frame_timeout: Duration::from_millis(100),
        }
    }
}

/// Serves `devices` (one shared bus) as Modbus RTU slaves on `stream` with
/// default [`RtuOptions`] until `shutdown` is cancelled or the stream ends.
pub async fn serve_rtu<S>(
    stream: S,
    devices: Vec<Device>,
    shutdown: CancellationToken,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    serve_rtu_with(stream, devices, RtuOptions::default(), shutdown).await
}

/// Opens the serial device (or PTY) at `path` with tokio-serial at `baud`
/// (8N1) and serves `devices` on it, see [`serve_rtu_with`].
pub async fn serve_rtu_path(
    path: &Path,
    baud: u32,
    devices: Vec<Device>,
    options: RtuOptions,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let port = tokio_serial::new(path.to_string_lossy(), baud)
        .open_native_async()
        .map_err(|e| io::Error::other(format!("opening {}: {e}", path.display())))?;
    serve_rtu_with(port, devices, options, shutdown).await
}

/// Serves `devices` as Modbus RTU slaves on `stream`.
///
/// Frames are found by function code (request length is known for 0x01–0x06,
/// 0x0F and 0x10; other codes by the first CRC-valid prefix) and CRC; bytes
/// that do not start a valid frame are skipped. Frames with a bad CRC or for
/// unknown units are ignored; unit 0 is a broadcast: writes are applied to every
/// non-silent device and nobody replies. Unsupported function codes get
/// exception 0x01, addresses beyond the bank 0x02, bad quantities 0x03.
/// Devices answer one at a time (the bus is half duplex): a delayed reply holds
/// up the bus. Returns `Ok` on shutdown or end of stream.
pub async fn serve_rtu_with<S>(
    mut stream: S,
    devices: Vec<Device>,
    options: RtuOptions,
    shutdown: CancellationToken,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let by_unit = unit_map(devices);
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let mut timer = crate::timer::PreciseTimer::new();
    loop {
        while let Some((start, len)) = scan(&mut buf) {
            let frame: Vec<u8> = buf.drain(..start + len).skip(start).collect();
            let Some((reply, delay)) = handle_frame(&by_unit, &frame, &options) else {
                continue;
            };
            if !delay.is_zero() {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = timer.sleep_until(tokio::time::Instant::now() + delay) => {}
                }
            }
            stream.write_all(&reply).await?;
            stream.flush().await?;
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            r = stream.read(&mut chunk) => match r? {
                0 => return Ok(()),
                n => buf.extend_from_slice(&chunk[..n]),
            },
            () = tokio::time::sleep(options.frame_timeout), if !buf.is_empty() => {
                tracing::trace!(bytes = buf.len(), "dropping incomplete RTU frame");
                buf.clear();
            }
        }
    }
}

/// What the bytes at the start of a buffer can be.
enum Candidate {
    /// Not a request start (unit > 247 or function code 0 / >= 0x80).
    Invalid,
    /// Too few bytes to know the length yet.
    NeedMore,
    /// A request of this total length (CRC included).
    Len(usize),
    /// A function code of unknown length: found by a CRC-valid prefix.
    ByCrc,
}

fn candidate(b: &[u8]) -> Candidate {
    match (b.first(), b.get(1)) {
        (Some(unit), _) if *unit > 247 => Candidate::Invalid,
        (_, None) => Candidate::NeedMore,
        (_, Some(0x01..=0x06)) => Candidate::Len(8),
        (_, Some(0x0F | 0x10)) => match b.get(6) {
            Some(count) => Candidate::Len(9 + usize::from(*count)),
            None => Candidate::NeedMore,
        },
        (_, Some(0x07..=0x7F)) => Candidate::ByCrc,
        _ => Candidate::Invalid,
    }
}

/// Finds the first complete CRC-valid frame in `buf` as `(start, len)`.
/// Without one, drops the leading bytes that cannot start a frame.
fn scan(buf: &mut Vec<u8>) -> Option<(usize, usize)> {
    let mut keep_from = buf.len();
    for start in 0..buf.len() {
        let b = &buf[start..];
        match candidate(b) {
            Candidate::Invalid => {}
            Candidate::NeedMore => keep_from = keep_from.min(start),
            Candidate::Len(n) if b.len() < n => keep_from = keep_from.min(start),
            Candidate::Len(n) => {
                if crc_ok(&b[..n]) {
                    return Some((start, n));
                }
            }
            Candidate::ByCrc => {
                if let Some(n) = crc_valid_prefix(b) {
                    return Some((start, n));
                }
                if b.len() < 256 {
                    keep_from = keep_from.min(start);
                }
            }
        }
    }
    buf.drain(..keep_from);
    None
}

/// Decodes a request PDU (function code first). `Err` is an exception code.
pub fn decode_request(pdu: &[u8]) -> Result<Op, u8> {
    let fc = *pdu.first().ok_or(EX_ILLEGAL_FUNCTION)?;
    let word = |i: usize| -> Result<u16, u8> {
        match (pdu.get(i), pdu.get(i + 1)) {
            (Some(h), Some(l)) => Ok(u16::from_be_bytes([*h, *l])),
            _ => Err(EX_ILLEGAL_VALUE),
        }
    };
    match fc {
        0x01 => Ok(Op::ReadCoils(word(1)?, word(3)?)),
        0x02 => Ok(Op::ReadDiscrete(word(1)?, word(3)?)),
        0x03 => Ok(Op::ReadHolding(word(1)?, word(3)?)),
        0x04 => Ok(Op::ReadInput(word(1)?, word(3)?)),
        0x05 => match word(3)? {
            0xFF00 => Ok(Op::WriteCoil(word(1)?, true)),
            0x0000 => Ok(Op::WriteCoil(word(1)?, false)),
            _ => Err(EX_ILLEGAL_VALUE),
        },
        0x06 => Ok(Op::WriteRegister(word(1)?, word(3)?)),
        0x0F => {
            let (addr, qty) = (word(1)?, word(3)?);
            let data = pdu.get(6..).unwrap_or_default();
            if qty == 0 || data.len() != usize::from(qty).div_ceil(8) {
                return Err(EX_ILLEGAL_VALUE);
            }
            let bits = (0..usize::from(qty))
                .map(|i| data[i / 8] & (1 << (i % 8)) != 0)
                .collect();
            Ok(Op::WriteCoils(addr, bits))
        }
        0x10 => {
            let (addr, qty) = (word(1)?, word(3)?);
            let data = pdu.get(6..).unwrap_or_default();
            if qty == 0 || data.len() != usize::from(qty) * 2 {
                return Err(EX_ILLEGAL_VALUE);
            }
            let words = data
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            Ok(Op::WriteRegisters(addr, words))
        }
        _ => Err(EX_ILLEGAL_FUNCTION),
    }
}

/// Encodes the reply PDU (function code first) for `fc`.
pub fn encode_reply(fc: u8, reply: &Reply) -> Vec<u8> {
    let mut pdu = vec![fc];
    match reply {
        Reply::Bits(bits) => {
            let mut bytes = vec![0u8; bits.len().div_ceil(8)];
            for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
                bytes[i / 8] |= 1 << (i % 8);
            }
            pdu.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
            pdu.extend_from_slice(&bytes);
        }
        Reply::Words(words) => {
            pdu.push(u8::try_from(words.len() * 2).unwrap_or(u8::MAX));
            for w in words {
                pdu.extend_from_slice(&w.to_be_bytes());
            }
        }
        Reply::Single(a, v) | Reply::Multiple(a, v) => {
            pdu.extend_from_slice(&a.to_be_bytes());
            pdu.extend_from_slice(&v.to_be_bytes());
        }
    }
    pdu
}

/// Handles one CRC-valid frame; returns the bytes to send and how long to wait
/// before sending them, or `None` for no reply.
fn handle_frame(
    devices: &HashMap<u8, Device>,
    frame: &[u8],
    options: &RtuOptions,
) -> Option<(Vec<u8>, Duration)> {
    let unit = frame[0];
    let fc = frame[1];
    let op = decode_request(&frame[1..frame.len() - 2]);
    if unit == 0 {
        for d in devices.values() {
            d.count_request();
            if let Ok(op) = &op {
                if op.is_write() && !d.faults().silent {
                    // Broadcast errors cannot be reported.
                    let _ = d.execute(op);
                }
            }
        }
        return None;
    }
    let device = devices.get(&unit)?;
    device.count_request();
    let faults = device.faults();
    if faults.silent {
        return None;
    }
    let result = match (faults.exception, op) {
        (Some(code), _) | (None, Err(code)) => Err(code),
        (None, Ok(op)) => device.execute(&op),
    };
    let mut adu = vec![unit];
    match result {
        Ok(reply) => adu.extend(encode_reply(fc, &reply)),
        Err(code) => adu.extend([fc | 0x80, code]),
    }
    push_crc(&mut adu);
    if faults.corrupt_crc {
        let n = adu.len();
        adu[n - 2] ^= 0xFF;
        adu[n - 1] ^= 0xFF;
    }
    if faults.truncate {
        adu.truncate(adu.len() / 2);
    }
    if faults.garbage_before {
        let mut rng = rand::thread_rng();
        let n = rng.gen_range(3..=6);
        let mut out: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        out.extend(adu);
        adu = out;
    }
    let mut wait = faults.delay + options.turnaround;
    if let Some(line) = options.line {
        wait += line.wire_time(frame.len() + adu.len());
    }
    device.count_reply();
    Some((adu, wait))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_known_vector() {
        // Read holding registers, unit 1, addr 0, qty 1: 01 03 00 00 00 01 84 0A
        let mut f = vec![0x01, 0x03, 0x00, 0x00, 0x00, 0x01];
        push_crc(&mut f);
        assert_eq!(f, [0x01, 0x03, 0x00, 0x00, 0x00, 0x01, 0x84, 0x0A]);
        assert!(crc_ok(&f));
        assert_eq!(crc16(b"123456789"), 0x4B37);
    }

    #[test]
    fn scan_skips_garbage_and_waits_for_more() {
        let mut req = vec![0x02, 0x10, 0x00, 0x05, 0x00, 0x02, 0x04, 0, 1, 0, 2];
        push_crc(&mut req);
        let mut buf = vec![0xAA, 0x03, 0x55];
        buf.extend_from_slice(&req[..5]);
        assert_eq!(scan(&mut buf), None);
        buf.extend_from_slice(&req[5..]);
        let (s, n) = scan(&mut buf).expect("frame");
        assert_eq!(&buf[s..s + n], &req[..]);
        assert_eq!(
            decode_request(&req[1..req.len() - 2]),
            Ok(Op::WriteRegisters(5, vec![1, 2]))
        );
    }

    #[test]
    fn unknown_function_found_by_crc() {
        let mut req = vec![0x01, 0x2B, 0x0E, 0x01, 0x00];
        push_crc(&mut req);
        let mut buf = req.clone();
        assert_eq!(scan(&mut buf), Some((0, req.len())));
        assert_eq!(decode_request(&req[1..]), Err(EX_ILLEGAL_FUNCTION));
    }

    #[test]
    fn bits_are_packed_lsb_first() {
        let pdu = encode_reply(
            0x01,
            &Reply::Bits(vec![
                true, false, true, false, false, false, false, false, true,
            ]),
        );
        assert_eq!(pdu, [0x01, 2, 0b0000_0101, 0b0000_0001]);
    }
}
