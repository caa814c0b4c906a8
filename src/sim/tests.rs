//! End-to-end tests of the simulators with real tokio-modbus clients.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};
use tokio_serial::SerialPortBuilderExt;
use tokio_util::sync::CancellationToken;

use super::*;

const T: Duration = Duration::from_millis(500);

fn regs_to_string(regs: &[u16]) -> String {
    let bytes: Vec<u8> = regs
        .iter()
        .flat_map(|r| r.to_be_bytes())
        .take_while(|b| *b != 0)
        .collect();
    String::from_utf8(bytes).expect("ascii")
}

fn rtu_client(path: &Path, unit: u8) -> Context {
    let port = tokio_serial::new(path.to_string_lossy(), 19_200)
        .open_native_async()
        .expect("open pty slave");
    tokio_modbus::client::rtu::attach_slave(port, Slave(unit))
}

async fn tcp_client(addr: std::net::SocketAddr, unit: u8) -> Context {
    tokio_modbus::client::tcp::connect_slave(addr, Slave(unit))
        .await
        .expect("connect")
}

/// Floor without running models, so that register values are exact.
fn quiet_floor(n_bag: usize, n_cab: usize) -> SimFloor {
    SimFloor {
        models: false,
        ..SimFloor::new(n_bag, n_cab)
    }
}

async fn read_u32(ctx: &mut Context, addr: u16) -> u32 {
    let r = tokio::time::timeout(T, ctx.read_holding_registers(addr, 2))
        .await
        .expect("no timeout")
        .expect("transport")
        .expect("no exception");
    (u32::from(r[0]) << 16) | u32::from(r[1])
}

#[tokio::test]
async fn rtu_two_units_on_one_pty() {
    let shutdown = CancellationToken::new();
    let (path, devices) = quiet_floor(1, 1).start_pty(shutdown.clone()).expect("pty");
    devices[0]
        .bank()
        .set_u32_abcd(bag::HR_BAGS_DISPENSED, 123_456);
    devices[1].bank().set_u32_abcd(cabinet::HR_RENTALS, 70_000);

    let mut ctx = rtu_client(&path, 1);
    let model = ctx
        .read_holding_registers(40, 8)
        .await
        .expect("io")
        .expect("ok");
    assert_eq!(regs_to_string(&model), "BAGDISP1");
    assert_eq!(read_u32(&mut ctx, bag::HR_BAGS_DISPENSED).await, 123_456);
    let bits = ctx.read_coils(0, 1).await.expect("io").expect("ok");
    assert!(bits[0]);
    let temp = ctx
        .read_input_registers(0, 2)
        .await
        .expect("io")
        .expect("ok");
    assert_eq!(temp, [220, 2400]);

    ctx.set_slave(Slave(2));
    let model = ctx
        .read_holding_registers(40, 8)
        .await
        .expect("io")
        .expect("ok");
    assert_eq!(regs_to_string(&model), "CHGCAB12");
    assert_eq!(read_u32(&mut ctx, cabinet::HR_RENTALS).await, 70_000);
    let slot1 = ctx
        .read_holding_registers(cabinet::slot_base(1), 4)
        .await
        .expect("io")
        .expect("ok");
    assert_eq!(slot1, [cabinet::FLAG_PRESENT, 100, 0, 1001]);

    // Unit 3 does not exist: nobody answers on RTU.
    ctx.set_slave(Slave(3));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), ctx.read_holding_registers(0, 1))
            .await
            .is_err()
    );
    assert_eq!(devices[0].requests(), 4);
    assert_eq!(devices[1].replies(), 3);
    shutdown.cancel();
}

#[tokio::test]
async fn rtu_client_can_reopen_the_pty() {
    let shutdown = CancellationToken::new();
    let (path, _devices) = quiet_floor(1, 0).start_pty(shutdown.clone()).expect("pty");
    for _ in 0..3 {
        let mut ctx = rtu_client(&path, 1);
        let r = tokio::time::timeout(T, ctx.read_holding_registers(bag::HR_STOCK, 1))
            .await
            .expect("answer")
            .expect("io")
            .expect("ok");
        assert_eq!(r, [500]);
        drop(ctx);
    }
    shutdown.cancel();
}

#[tokio::test]
async fn rtu_faults() {
    let shutdown = CancellationToken::new();
    let (path, devices) = quiet_floor(2, 0).start_pty(shutdown.clone()).expect("pty");
    let d = &devices[0];

    // Corrupted CRC: error or timeout.
    d.update_faults(|f| f.corrupt_crc = true);
    let mut ctx = rtu_client(&path, 1);
    let r = tokio::time::timeout(T, ctx.read_holding_registers(0, 2)).await;
    assert!(!matches!(r, Ok(Ok(Ok(_)))), "corrupt CRC accepted: {r:?}");
    drop(ctx);

    // Truncated reply: error or timeout.
    d.set_faults(Faults {
        truncate: true,
        ..Faults::default()
    });
    let mut ctx = rtu_client(&path, 1);
    let r = tokio::time::timeout(T, ctx.read_holding_registers(0, 2)).await;
    assert!(
        !matches!(r, Ok(Ok(Ok(_)))),
        "truncated reply accepted: {r:?}"
    );
    drop(ctx);

    // Silent: timeout, but the request is counted.
    d.set_faults(Faults {
        silent: true,
        ..Faults::default()
    });
    let before = d.requests();
    let mut ctx = rtu_client(&path, 1);
    let r =
        tokio::time::timeout(Duration::from_millis(300), ctx.read_holding_registers(0, 2)).await;
    assert!(r.is_err(), "silent device answered: {r:?}");
    assert_eq!(d.requests(), before + 1);
    drop(ctx);

    // Exception fault.
    d.set_faults(Faults {
        exception: Some(0x06),
        ..Faults::default()
    });
    let mut ctx = rtu_client(&path, 1);
    let r = ctx.read_holding_registers(0, 2).await.expect("io");
    assert_eq!(r, Err(ExceptionCode::ServerDeviceBusy));

    // Delay: answered late.
    d.set_faults(Faults {
        delay: Duration::from_millis(150),
        ..Faults::default()
    });
    let t0 = Instant::now();
    let r = ctx
        .read_holding_registers(2, 1)
        .await
        .expect("io")
        .expect("ok");
    assert_eq!(r, [500]);
    assert!(t0.elapsed() >= Duration::from_millis(150));

    // Garbage before the reply: tokio-modbus' decoder usually skips it and
    // returns the value; random garbage may occasionally confuse it, so only
    // check that it never yields a wrong value.
    d.set_faults(Faults {
        garbage_before: true,
        ..Faults::default()
    });
    let r = tokio::time::timeout(T, ctx.read_holding_registers(2, 1)).await;
    if let Ok(Ok(Ok(v))) = r {
        assert_eq!(v, [500]);
    }

    // Other unit on the same bus is unaffected throughout.
    d.clear_faults();
    ctx.set_slave(Slave(2));
    let r = ctx
        .read_holding_registers(2, 1)
        .await
        .expect("io")
        .expect("ok");
    assert_eq!(r, [500]);
    shutdown.cancel();
}

#[tokio::test]
async fn rtu_writes_exceptions_and_broadcast() {
    let shutdown = CancellationToken::new();
    let (path, devices) = quiet_floor(2, 0).start_pty(shutdown.clone()).expect("pty");
    let mut ctx = rtu_client(&path, 1);

    ctx.write_single_register(bag::HR_PRICE_CENTS, 25)
        .await
        .expect("io")
        .expect("ok");
    assert_eq!(devices[0].bank().holding(bag::HR_PRICE_CENTS), 25);
    ctx.write_single_coil(bag::COIL_ENABLED, false)
        .await
        .expect("io")
        .expect("ok");
    assert!(!devices[0].bank().coil(bag::COIL_ENABLED));
    ctx.write_multiple_registers(200, &[1, 2, 3])
        .await
        .expect("io")
        .expect("ok");
    assert_eq!(devices[0].bank().holding(202), 3);
    ctx.write_multiple_coils(5, &[true, false, true])
        .await
        .expect("io")
        .expect("ok");
    assert!(devices[0].bank().coil(7));
    let di = ctx
        .read_discrete_inputs(0, 2)
        .await
        .expect("io")
        .expect("ok");
    assert_eq!(&di[..2], &[false, false]);

    let r = ctx.read_holding_registers(9_999, 2).await.expect("io");
    assert_eq!(r, Err(ExceptionCode::IllegalDataAddress));
    let r = ctx.masked_write_register(0, 0xFF, 0).await.expect("io");
    assert_eq!(r, Err(ExceptionCode::IllegalFunction));
    assert_eq!(devices[1].requests(), 0);

    // Broadcast: applied by both, nobody answers (the client waits anyway).
    ctx.set_slave(Slave(0));
    let r = tokio::time::timeout(
        Duration::from_millis(200),
        ctx.write_single_register(bag::HR_PRICE_CENTS, 99),
    )
    .await;
    assert!(r.is_err());
    for d in &devices {
        assert_eq!(d.bank().holding(bag::HR_PRICE_CENTS), 99);
    }
    shutdown.cancel();
}

#[tokio::test]
async fn rtu_line_timing() {
    let shutdown = CancellationToken::new();
    let mut floor = quiet_floor(1, 0);
    floor.rtu.line = Some(LineTiming { baud: 9_600 });
    floor.rtu.turnaround = Duration::from_millis(5);
    let (path, _devices) = floor.start_pty(shutdown.clone()).expect("pty");
    let mut ctx = rtu_client(&path, 1);
    // Request 8 bytes + reply 3 + 2*10 + 2 = 25 bytes -> 33 chars at 9600 baud.
    let expected = LineTiming { baud: 9_600 }.wire_time(33) + Duration::from_millis(5);
    let n = 5;
    let t0 = Instant::now();
    for _ in 0..n {
        ctx.read_holding_registers(0, 10)
            .await
            .expect("io")
            .expect("ok");
    }
    let per = t0.elapsed() / n;
    assert!(per >= expected, "{per:?} < {expected:?}");
    assert!(
        per < expected + Duration::from_millis(100),
        "{per:?} vs {expected:?}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn tcp_two_units_and_faults() {
    let shutdown = CancellationToken::new();
    let (addr, devices) = quiet_floor(1, 1)
        .start_tcp(([127, 0, 0, 1], 0).into(), shutdown.clone())
        .await
        .expect("tcp");
    devices[0].bank().set_u32_abcd(bag::HR_BAGS_DISPENSED, 42);

    let mut ctx = tcp_client(addr, 1).await;
    let model = ctx
        .read_holding_registers(40, 8)
        .await
        .expect("io")
        .expect("ok");
    assert_eq!(regs_to_string(&model), "BAGDISP1");
    assert_eq!(read_u32(&mut ctx, 0).await, 42);
    ctx.set_slave(Slave(2));
    let model = ctx
        .read_holding_registers(40, 8)
        .await
        .expect("io")
        .expect("ok");
    assert_eq!(regs_to_string(&model), "CHGCAB12");
    let temp = ctx
        .read_input_registers(0, 1)
        .await
        .expect("io")
        .expect("ok");
    assert_eq!(temp, [280]);

    // Write single register changes the bank.
    ctx.write_single_register(cabinet::HR_RENTAL_PRICE_CENTS, 250)
        .await
        .expect("io")
        .expect("ok");
    assert_eq!(
        devices[1].bank().holding(cabinet::HR_RENTAL_PRICE_CENTS),
        250
    );

    // Unknown unit: gateway target exception.
    ctx.set_slave(Slave(9));
    let r = ctx.read_holding_registers(0, 1).await.expect("io");
    assert_eq!(r, Err(ExceptionCode::GatewayTargetDevice));

    // Exception fault.
    devices[0].update_faults(|f| f.exception = Some(0x04));
    ctx.set_slave(Slave(1));
    let r = ctx.read_holding_registers(0, 1).await.expect("io");
    assert_eq!(r, Err(ExceptionCode::ServerDeviceFailure));

    // Silent: the client times out (use a fresh connection afterwards).
    devices[0].set_faults(Faults {
        silent: true,
        ..Faults::default()
    });
    let r =
        tokio::time::timeout(Duration::from_millis(300), ctx.read_holding_registers(0, 1)).await;
    assert!(r.is_err(), "silent device answered: {r:?}");
    devices[0].clear_faults();
    let mut ctx = tcp_client(addr, 1).await;
    assert_eq!(read_u32(&mut ctx, 0).await, 42);
    shutdown.cancel();
}

#[tokio::test]
async fn floor_models_run() {
    let shutdown = CancellationToken::new();
    let mut floor = SimFloor::new(1, 1);
    // Peak traffic, 600 dispenses per minute: ~1 per 100 ms tick.
    floor.timescale = TimeScale::realtime()
        .starting_at(Duration::from_secs(12 * 3600))
        .with_rate(150.0);
    let (addr, devices) = floor
        .start_tcp(([127, 0, 0, 1], 0).into(), shutdown.clone())
        .await
        .expect("tcp");
    let mut ctx = tcp_client(addr, 1).await;
    let first = read_u32(&mut ctx, bag::HR_BAGS_DISPENSED).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let second = read_u32(&mut ctx, bag::HR_BAGS_DISPENSED).await;
    // A rare jam (0.4 % per bag) pauses dispensing for a while.
    let jammed = devices[0].bank().discrete(bag::DI_JAM);
    assert!(second > first || jammed, "{first} -> {second}");
    assert_eq!(devices[0].requests(), 2);
    shutdown.cancel();
}
