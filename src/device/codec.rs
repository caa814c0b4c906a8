//! Decoding and encoding of Modbus register values: data types, word orders, scaling.
//!
//! A point's raw registers (or bits, for the coil and discrete tables) are turned into a
//! [`Value`] by [`decode_registers`] / [`decode_bit`], then into engineering units by
//! [`apply_scale`]. Writes go the other way through [`encode_registers`], which undoes the
//! scale/offset and refuses anything the target type cannot hold exactly.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A Modbus data table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    /// Holding registers (read/write, 16-bit).
    Holding,
    /// Input registers (read-only, 16-bit).
    Input,
    /// Coils (read/write, 1-bit).
    Coil,
    /// Discrete inputs (read-only, 1-bit).
    Discrete,
}

impl Table {
    /// True for the 1-bit tables (coil and discrete).
    pub fn is_bit(self) -> bool {
        matches!(self, Table::Coil | Table::Discrete)
    }

    /// The table's name as used in configuration (`holding`, `input`, `coil`, `discrete`).
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Holding => "holding",
            Table::Input => "input",
            Table::Coil => "coil",
            Table::Discrete => "discrete",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The data type of a point's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    /// Unsigned 16-bit integer (1 register).
    U16,
    /// Signed 16-bit integer (1 register).
    I16,
    /// Unsigned 32-bit integer (2 registers).
    U32,
    /// Signed 32-bit integer (2 registers).
    I32,
    /// Unsigned 64-bit integer (4 registers).
    U64,
    /// Signed 64-bit integer (4 registers).
    I64,
    /// IEEE-754 single precision float (2 registers).
    F32,
    /// IEEE-754 double precision float (4 registers).
    F64,
    /// Boolean: one bit of a bit table, a bit of a register, or a whole register (non-zero).
    Bool,
    /// Text packed two bytes per register; its length in registers is configured separately.
    String,
}

impl DataType {
    /// Registers (or bits, for bit tables) this type occupies; `len` is the string length in
    /// registers and is ignored for the other types.
    pub fn width(self, len: u16) -> u16 {
        match self {
            DataType::U16 | DataType::I16 | DataType::Bool => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
            DataType::String => len,
        }
    }

    /// Bits of an integer type (16/32/64), `None` for the others; used for counter wrap.
    pub fn int_bits(self) -> Option<u32> {
        match self {
            DataType::U16 | DataType::I16 => Some(16),
            DataType::U32 | DataType::I32 => Some(32),
            DataType::U64 | DataType::I64 => Some(64),
            DataType::F32 | DataType::F64 | DataType::Bool | DataType::String => None,
        }
    }

    /// True for the integer types (u16 … i64).
    pub fn is_integer(self) -> bool {
        self.int_bits().is_some()
    }

    /// The type's name as used in configuration (`u16`, `f32`, `string`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::U16 => "u16",
            DataType::I16 => "i16",
            DataType::U32 => "u32",
            DataType::I32 => "i32",
            DataType::U64 => "u64",
            DataType::I64 => "i64",
            DataType::F32 => "f32",
            DataType::F64 => "f64",
            DataType::Bool => "bool",
            DataType::String => "string",
        }
    }

    fn is_signed(self) -> bool {
        matches!(self, DataType::I16 | DataType::I32 | DataType::I64)
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Byte/word order of a multi-register value, named after the byte sequence on the wire for
/// a 32-bit value whose big-endian bytes are `A B C D`.
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
pub enum WordOrder {
    /// Big-endian: first register holds the most significant word, high byte first.
    #[default]
    ABCD,
    /// Registers in reverse order (least significant word first), bytes big-endian.
    CDAB,
    /// Registers in order, bytes swapped within each register.
    BADC,
    /// Fully little-endian: registers reversed and bytes swapped.
    DCBA,
}

impl WordOrder {
    /// True when the least significant register comes first.
    fn words_reversed(self) -> bool {
        matches!(self, WordOrder::CDAB | WordOrder::DCBA)
    }

    /// True when the two bytes of each register are swapped.
    fn bytes_swapped(self) -> bool {
        matches!(self, WordOrder::BADC | WordOrder::DCBA)
    }

    /// The order's name (`ABCD`, `CDAB`, `BADC`, `DCBA`).
    pub fn as_str(self) -> &'static str {
        match self {
            WordOrder::ABCD => "ABCD",
            WordOrder::CDAB => "CDAB",
            WordOrder::BADC => "BADC",
            WordOrder::DCBA => "DCBA",
        }
    }
}

impl fmt::Display for WordOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decoded point value; serializes to JSON as a plain bool, number or string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// A boolean.
    Bool(bool),
    /// An unsigned integer (raw u16/u32/u64).
    UInt(u64),
    /// A signed integer (raw i16/i32/i64).
    Int(i64),
    /// A floating point number (raw f32/f64, or any scaled value).
    Float(f64),
    /// Text.
    Str(String),
}

impl Value {
    /// The value as `f64` for numeric values (`UInt`, `Int`, `Float`); `None` for bool and
    /// string. Integers beyond 2^53 are rounded to the nearest `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::UInt(u) => Some(u as f64),
            Value::Int(i) => Some(i as f64),
            Value::Float(f) => Some(f),
            Value::Bool(_) | Value::Str(_) => None,
        }
    }

    /// The value as `u64` when it is a non-negative whole number that fits: `UInt`,
    /// non-negative `Int`, or a finite integral `Float` in range; `None` otherwise.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::UInt(u) => Some(u),
            Value::Int(i) => u64::try_from(i).ok(),
            // 2^64 is exactly representable; anything below it that is integral fits.
            Value::Float(f) if f.fract() == 0.0 && (0.0..TWO_POW_64).contains(&f) => Some(f as u64),
            Value::Float(_) | Value::Bool(_) | Value::Str(_) => None,
        }
    }

    /// A short name of the value's kind, for error messages.
    fn kind(&self) -> &'static str {
        match self {
            Value::Bool(_) => "boolean",
            Value::UInt(_) => "unsigned integer",
            Value::Int(_) => "signed integer",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
        }
    }
}

const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;

/// Tolerance (relative to the magnitude, at least absolute) under which an unscaled raw
/// value counts as a whole number for integer types.
const INTEGRAL_TOLERANCE: f64 = 1e-9;

/// Why a value could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The number of registers does not match the type's width.
    #[error("{ty} needs {expected} register(s), got {got}")]
    WidthMismatch {
        /// The point's type.
        ty: DataType,
        /// Registers the type occupies.
        expected: u16,
        /// Registers that were given.
        got: usize,
    },
    /// A bit point on a bit table must be decoded from exactly one bit.
    #[error("a bit-table point is decoded from exactly 1 bit, got {got}")]
    BitCount {
        /// Bits that were given.
        got: usize,
    },
    /// A bit index outside a 16-bit register.
    #[error("bit index {bit} is out of range: a register has bits 0 to 15")]
    BitOutOfRange {
        /// The requested bit index.
        bit: u8,
    },
    /// A bit index on a type wider than one register.
    #[error("a bit index needs a one-register type (bool, u16, i16), not {ty}")]
    BitOnWideType {
        /// The point's type.
        ty: DataType,
    },
    /// Writing a single bit of a register is a read-modify-write the caller must do.
    #[error(
        "writing bit {bit} of a register is not an encode: read the register, \
         change the bit (see set_bit) and write the register back"
    )]
    BitWrite {
        /// The requested bit index.
        bit: u8,
    },
    /// The value's kind cannot be written to the type (e.g. a string to a u16).
    #[error("cannot write a {kind} value to a {ty} point")]
    WrongKind {
        /// The point's type.
        ty: DataType,
        /// The kind of the given value.
        kind: &'static str,
    },
    /// The value is not a boolean and not the number 0 or 1.
    #[error("cannot write {value} to a bool point: use true/false or 0/1")]
    NotBool {
        /// The given value, rendered.
        value: String,
    },
    /// The scale/offset cannot be undone for a write.
    #[error("cannot undo scale {scale} and offset {offset}: the scale must be finite and non-zero and the offset finite")]
    BadScaling {
        /// The configured scale.
        scale: f64,
        /// The configured offset.
        offset: f64,
    },
    /// The raw value is NaN or infinite but the type is an integer.
    #[error("raw value {raw} is not a finite number, so it cannot be written to a {ty} point")]
    NotFinite {
        /// The point's type.
        ty: DataType,
        /// The raw value after undoing scale/offset.
        raw: f64,
    },
    /// The raw value has a fractional part but the type is an integer.
    #[error("raw value {raw} (after undoing scale/offset) is not a whole number, so it cannot be written to a {ty} point")]
    NotIntegral {
        /// The point's type.
        ty: DataType,
        /// The raw value after undoing scale/offset.
        raw: f64,
    },
    /// The raw value is outside the type's range.
    #[error("raw value {raw} (after undoing scale/offset) is out of range for {ty}: allowed {min} to {max}")]
    OutOfRange {
        /// The point's type.
        ty: DataType,
        /// The raw value, rendered.
        raw: String,
        /// The type's minimum, rendered.
        min: String,
        /// The type's maximum, rendered.
        max: String,
    },
    /// A finite raw value too large in magnitude for a 32-bit float.
    #[error("raw value {raw} (after undoing scale/offset) overflows f32 (largest is {max})", max = f32::MAX)]
    FloatOverflow {
        /// The raw value after undoing scale/offset.
        raw: f64,
    },
    /// The string does not fit in the point's registers.
    #[error("string of {bytes} bytes does not fit in {regs} register(s) ({max} bytes)", max = usize::from(*regs) * 2)]
    StringTooLong {
        /// UTF-8 length of the given string.
        bytes: usize,
        /// Registers configured for the point.
        regs: u16,
    },
}

/// Decode one point's raw registers.
///
/// `regs.len()` must equal `ty.width(len)` (for strings any length is accepted: it is the
/// string length in registers). With `bit = Some(b)` the point is bit `b` (0..16) of
/// `regs[0]` as received (word order does not apply) and decodes to [`Value::Bool`]; the type
/// must then be a one-register type (bool, u16, i16). A bool without a bit is true when the
/// register is non-zero. Integers decode to [`Value::UInt`] / [`Value::Int`], floats to
/// [`Value::Float`] (f32 widened exactly), strings to [`Value::Str`].
pub fn decode_registers(
    regs: &[u16],
    ty: DataType,
    order: WordOrder,
    bit: Option<u8>,
) -> Result<Value, CodecError> {
    let expected = match ty {
        DataType::String => regs.len(),
        _ => usize::from(ty.width(0)),
    };
    if regs.len() != expected {
        return Err(CodecError::WidthMismatch {
            ty,
            expected: ty.width(0),
            got: regs.len(),
        });
    }
    if let Some(b) = bit {
        if b >= 16 {
            return Err(CodecError::BitOutOfRange { bit: b });
        }
        if ty.width(0) != 1 || ty == DataType::String {
            return Err(CodecError::BitOnWideType { ty });
        }
        let reg = regs.first().copied().unwrap_or(0);
        return Ok(Value::Bool((reg >> b) & 1 == 1));
    }
    let value = match ty {
        DataType::Bool => Value::Bool(regs.iter().any(|&r| r != 0)),
        DataType::String => Value::Str(decode_string(regs, order)),
        DataType::F32 => Value::Float(f64::from(f32::from_bits(raw_bits(regs, order) as u32))),
        DataType::F64 => Value::Float(f64::from_bits(raw_bits(regs, order))),
        DataType::U16 | DataType::U32 | DataType::U64 => Value::UInt(raw_bits(regs, order)),
        DataType::I16 => Value::Int(i64::from(raw_bits(regs, order) as u16 as i16)),
        DataType::I32 => Value::Int(i64::from(raw_bits(regs, order) as u32 as i32)),
        DataType::I64 => Value::Int(raw_bits(regs, order) as i64),
    };
    Ok(value)
}

/// Decode a point of a bit table (coil or discrete) from its bits: exactly one bit, giving
/// [`Value::Bool`].
pub fn decode_bit(bits: &[bool]) -> Result<Value, CodecError> {
    match bits {
        [b] => Ok(Value::Bool(*b)),
        _ => Err(CodecError::BitCount { got: bits.len() }),
    }
}

/// Apply scale/offset: with `scale == 1.0` and `offset == 0.0` the value is returned
/// unchanged, otherwise numeric values become `Float(x * scale + offset)`; bool and string
/// values are never changed.
pub fn apply_scale(v: Value, scale: f64, offset: f64) -> Value {
    if is_identity(scale, offset) {
        return v;
    }
    match v.as_f64() {
        Some(x) => Value::Float(x * scale + offset),
        None => v,
    }
}

/// Turn an engineering value into the raw registers of a point (the inverse of
/// [`decode_registers`] followed by [`apply_scale`]).
///
/// The scale/offset is undone (`raw = (x - offset) / scale`) for numeric types; with the
/// identity scaling integer values are taken exactly. Integer types accept numeric values
/// whose raw value is a whole number (float noise up to 1e-9 relative is rounded away) in
/// the type's range. Float types accept any number; NaN and infinities pass through, but a
/// finite value too large for f32 is an error. Bool accepts `true`/`false` or the number 0/1
/// and is written as the register value 0/1. Strings take a [`Value::Str`] of at most
/// `len * 2` bytes, padded with NUL. `len` is the string length in registers (ignored for
/// other types). Bits of a register are not written here: see [`encode_point`].
pub fn encode_registers(
    v: &Value,
    ty: DataType,
    order: WordOrder,
    scale: f64,
    offset: f64,
    len: u16,
) -> Result<Vec<u16>, CodecError> {
    match ty {
        DataType::String => encode_string(v, order, len),
        DataType::Bool => Ok(words_from_bits(u64::from(value_to_bool(v)?), 1, order)),
        DataType::F32 => {
            let raw = unscale_float(v, ty, scale, offset)?;
            let narrowed = raw as f32;
            if raw.is_finite() && narrowed.is_infinite() {
                return Err(CodecError::FloatOverflow { raw });
            }
            Ok(words_from_bits(u64::from(narrowed.to_bits()), 2, order))
        }
        DataType::F64 => {
            let raw = unscale_float(v, ty, scale, offset)?;
            Ok(words_from_bits(raw.to_bits(), 4, order))
        }
        DataType::U16
        | DataType::I16
        | DataType::U32
        | DataType::I32
        | DataType::U64
        | DataType::I64 => {
            let raw = unscale_integer(v, ty, scale, offset)?;
            let bits = ty.int_bits().unwrap_or(64);
            let (min, max) = int_range(ty, bits);
            if raw < min || raw > max {
                return Err(CodecError::OutOfRange {
                    ty,
                    raw: raw.to_string(),
                    min: min.to_string(),
                    max: max.to_string(),
                });
            }
            // Two's complement truncated to the type's width.
            let mask = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let pattern = (raw as i64 as u64) & mask;
            Ok(words_from_bits(pattern, ty.width(0), order))
        }
    }
}

/// Like [`encode_registers`], for a point that may address a bit of a register: with
/// `bit = Some(_)` this is an error ([`CodecError::BitWrite`]), since such a write is a
/// read-modify-write of the whole register (see [`set_bit`]).
pub fn encode_point(
    v: &Value,
    ty: DataType,
    order: WordOrder,
    scale: f64,
    offset: f64,
    len: u16,
    bit: Option<u8>,
) -> Result<Vec<u16>, CodecError> {
    match bit {
        Some(bit) => Err(CodecError::BitWrite { bit }),
        None => encode_registers(v, ty, order, scale, offset, len),
    }
}

/// Encode a value for a bit-table point (a coil write): `true`/`false` or the number 0/1.
pub fn encode_bit(v: &Value) -> Result<bool, CodecError> {
    value_to_bool(v)
}

/// Set or clear bit `bit` (0..16) of a register value as received, for the read-modify-write
/// of a bit-in-register point.
pub fn set_bit(reg: u16, bit: u8, on: bool) -> Result<u16, CodecError> {
    if bit >= 16 {
        return Err(CodecError::BitOutOfRange { bit });
    }
    let mask = 1u16 << bit;
    Ok(if on { reg | mask } else { reg & !mask })
}

fn is_identity(scale: f64, offset: f64) -> bool {
    scale == 1.0 && offset == 0.0
}

/// Combine registers into an integer whose big-endian bytes are `A B C D …`, undoing `order`.
/// Callers pass at most 4 registers.
fn raw_bits(regs: &[u16], order: WordOrder) -> u64 {
    let fold = |acc: u64, &r: &u16| {
        let r = if order.bytes_swapped() {
            r.swap_bytes()
        } else {
            r
        };
        (acc << 16) | u64::from(r)
    };
    if order.words_reversed() {
        regs.iter().rev().fold(0, fold)
    } else {
        regs.iter().fold(0, fold)
    }
}

/// Split the low `count * 16` bits of `bits` into registers in `order`.
fn words_from_bits(bits: u64, count: u16, order: WordOrder) -> Vec<u16> {
    let mut words: Vec<u16> = (0..count)
        .rev()
        .map(|i| {
            let w = (bits >> (16 * u32::from(i))) as u16;
            if order.bytes_swapped() {
                w.swap_bytes()
            } else {
                w
            }
        })
        .collect();
    if order.words_reversed() {
        words.reverse();
    }
    words
}

fn decode_string(regs: &[u16], order: WordOrder) -> String {
    let mut bytes: Vec<u8> = regs
        .iter()
        .flat_map(|&r| {
            if order.bytes_swapped() {
                r.to_le_bytes()
            } else {
                r.to_be_bytes()
            }
        })
        .collect();
    while matches!(bytes.last(), Some(0 | b' ')) {
        bytes.pop();
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn encode_string(v: &Value, order: WordOrder, len: u16) -> Result<Vec<u16>, CodecError> {
    let Value::Str(s) = v else {
        return Err(CodecError::WrongKind {
            ty: DataType::String,
            kind: v.kind(),
        });
    };
    let bytes = s.as_bytes();
    if bytes.len() > usize::from(len) * 2 {
        return Err(CodecError::StringTooLong {
            bytes: bytes.len(),
            regs: len,
        });
    }
    let words = (0..usize::from(len))
        .map(|i| {
            let hi = bytes.get(2 * i).copied().unwrap_or(0);
            let lo = bytes.get(2 * i + 1).copied().unwrap_or(0);
            if order.bytes_swapped() {
                u16::from_le_bytes([hi, lo])
            } else {
                u16::from_be_bytes([hi, lo])
            }
        })
        .collect();
    Ok(words)
}

fn value_to_bool(v: &Value) -> Result<bool, CodecError> {
    match *v {
        Value::Bool(b) => Ok(b),
        Value::UInt(0) | Value::Int(0) => Ok(false),
        Value::UInt(1) | Value::Int(1) => Ok(true),
        Value::Float(0.0) => Ok(false),
        Value::Float(1.0) => Ok(true),
        Value::Str(_) => Err(CodecError::WrongKind {
            ty: DataType::Bool,
            kind: v.kind(),
        }),
        Value::UInt(_) | Value::Int(_) | Value::Float(_) => {
            Err(CodecError::NotBool { value: render(v) })
        }
    }
}

fn render(v: &Value) -> String {
    match v {
        Value::Bool(b) => b.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Str(s) => format!("{s:?}"),
    }
}

fn check_scaling(scale: f64, offset: f64) -> Result<(), CodecError> {
    if scale.is_finite() && scale != 0.0 && offset.is_finite() {
        Ok(())
    } else {
        Err(CodecError::BadScaling { scale, offset })
    }
}

/// The raw number for a float type: numeric values only, scale/offset undone.
fn unscale_float(v: &Value, ty: DataType, scale: f64, offset: f64) -> Result<f64, CodecError> {
    let x = match v {
        Value::UInt(_) | Value::Int(_) | Value::Float(_) => v.as_f64().unwrap_or(f64::NAN),
        Value::Bool(_) | Value::Str(_) => return Err(CodecError::WrongKind { ty, kind: v.kind() }),
    };
    if is_identity(scale, offset) {
        return Ok(x);
    }
    check_scaling(scale, offset)?;
    Ok((x - offset) / scale)
}

/// The raw whole number for an integer type (range not yet checked).
fn unscale_integer(v: &Value, ty: DataType, scale: f64, offset: f64) -> Result<i128, CodecError> {
    let identity = is_identity(scale, offset);
    let x = match *v {
        Value::UInt(u) if identity => return Ok(i128::from(u)),
        Value::Int(i) if identity => return Ok(i128::from(i)),
        Value::UInt(_) | Value::Int(_) | Value::Float(_) => v.as_f64().unwrap_or(f64::NAN),
        Value::Bool(_) | Value::Str(_) => return Err(CodecError::WrongKind { ty, kind: v.kind() }),
    };
    let raw = if identity {
        x
    } else {
        check_scaling(scale, offset)?;
        (x - offset) / scale
    };
    if !raw.is_finite() {
        return Err(CodecError::NotFinite { ty, raw });
    }
    let rounded = raw.round();
    if (raw - rounded).abs() > INTEGRAL_TOLERANCE * raw.abs().max(1.0) {
        return Err(CodecError::NotIntegral { ty, raw });
    }
    // Far beyond any 64-bit range: report without converting (the cast would saturate).
    if rounded.abs() >= 2.0 * TWO_POW_64 {
        let (min, max) = int_range(ty, ty.int_bits().unwrap_or(64));
        return Err(CodecError::OutOfRange {
            ty,
            raw: raw.to_string(),
            min: min.to_string(),
            max: max.to_string(),
        });
    }
    Ok(rounded as i128)
}

fn int_range(ty: DataType, bits: u32) -> (i128, i128) {
    if ty.is_signed() {
        (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
    } else {
        (0, (1i128 << bits) - 1)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ORDERS: [WordOrder; 4] = [
        WordOrder::ABCD,
        WordOrder::CDAB,
        WordOrder::BADC,
        WordOrder::DCBA,
    ];
    const TYPES: [DataType; 10] = [
        DataType::U16,
        DataType::I16,
        DataType::U32,
        DataType::I32,
        DataType::U64,
        DataType::I64,
        DataType::F32,
        DataType::F64,
        DataType::Bool,
        DataType::String,
    ];

    fn order() -> impl Strategy<Value = WordOrder> {
        prop::sample::select(ORDERS.to_vec())
    }

    fn enc(v: Value, ty: DataType, order: WordOrder) -> Result<Vec<u16>, CodecError> {
        encode_registers(&v, ty, order, 1.0, 0.0, 4)
    }

    fn roundtrip(v: Value, ty: DataType, order: WordOrder, len: u16) -> Value {
        let regs = encode_registers(&v, ty, order, 1.0, 0.0, len).unwrap();
        assert_eq!(regs.len(), usize::from(ty.width(len)));
        decode_registers(&regs, ty, order, None).unwrap()
    }

    #[test]
    fn u32_vectors() {
        let v = Value::UInt(0x1234_5678);
        let cases = [
            (WordOrder::ABCD, [0x1234, 0x5678]),
            (WordOrder::CDAB, [0x5678, 0x1234]),
            (WordOrder::BADC, [0x3412, 0x7856]),
            (WordOrder::DCBA, [0x7856, 0x3412]),
        ];
        for (order, regs) in cases {
            assert_eq!(
                enc(v.clone(), DataType::U32, order).unwrap(),
                regs,
                "{order}"
            );
            assert_eq!(
                decode_registers(&regs, DataType::U32, order, None).unwrap(),
                v,
                "{order}"
            );
        }
    }

    #[test]
    fn u64_vectors() {
        let v = Value::UInt(0x0102_0304_0506_0708);
        let cases = [
            (WordOrder::ABCD, [0x0102, 0x0304, 0x0506, 0x0708]),
            (WordOrder::CDAB, [0x0708, 0x0506, 0x0304, 0x0102]),
            (WordOrder::BADC, [0x0201, 0x0403, 0x0605, 0x0807]),
            (WordOrder::DCBA, [0x0807, 0x0605, 0x0403, 0x0201]),
        ];
        for (order, regs) in cases {
            assert_eq!(
                enc(v.clone(), DataType::U64, order).unwrap(),
                regs,
                "{order}"
            );
            assert_eq!(
                decode_registers(&regs, DataType::U64, order, None).unwrap(),
                v
            );
        }
    }

    #[test]
    fn sixteen_bit_orders() {
        for order in [WordOrder::ABCD, WordOrder::CDAB] {
            assert_eq!(
                enc(Value::UInt(0x1234), DataType::U16, order).unwrap(),
                [0x1234]
            );
        }
        for order in [WordOrder::BADC, WordOrder::DCBA] {
            assert_eq!(
                enc(Value::UInt(0x1234), DataType::U16, order).unwrap(),
                [0x3412]
            );
        }
    }

    #[test]
    fn f32_one() {
        assert_eq!(
            enc(Value::Float(1.0), DataType::F32, WordOrder::ABCD).unwrap(),
            [0x3F80, 0x0000]
        );
        assert_eq!(
            decode_registers(&[0x3F80, 0], DataType::F32, WordOrder::ABCD, None).unwrap(),
            Value::Float(1.0)
        );
        assert_eq!(
            decode_registers(&[0, 0x3F80], DataType::F32, WordOrder::CDAB, None).unwrap(),
            Value::Float(1.0)
        );
    }

    #[test]
    fn i16_minus_one() {
        assert_eq!(
            decode_registers(&[0xFFFF], DataType::I16, WordOrder::ABCD, None).unwrap(),
            Value::Int(-1)
        );
        assert_eq!(
            decode_registers(&[0xFFFF], DataType::U16, WordOrder::ABCD, None).unwrap(),
            Value::UInt(0xFFFF)
        );
        assert_eq!(
            enc(Value::Int(-1), DataType::I16, WordOrder::ABCD).unwrap(),
            [0xFFFF]
        );
        assert_eq!(
            enc(Value::Int(-2), DataType::I32, WordOrder::ABCD).unwrap(),
            [0xFFFF, 0xFFFE]
        );
    }

    #[test]
    fn bits_and_bools() {
        let r = [0b1000_0000_0000_0101u16];
        let d = |bit| decode_registers(&r, DataType::Bool, WordOrder::ABCD, Some(bit));
        assert_eq!(d(0).unwrap(), Value::Bool(true));
        assert_eq!(d(1).unwrap(), Value::Bool(false));
        assert_eq!(d(2).unwrap(), Value::Bool(true));
        assert_eq!(d(15).unwrap(), Value::Bool(true));
        assert_eq!(d(16), Err(CodecError::BitOutOfRange { bit: 16 }));
        // Word order does not move bits of a register.
        assert_eq!(
            decode_registers(&r, DataType::U16, WordOrder::DCBA, Some(0)).unwrap(),
            Value::Bool(true)
        );
        assert_eq!(
            decode_registers(&[0, 1], DataType::U32, WordOrder::ABCD, Some(0)),
            Err(CodecError::BitOnWideType { ty: DataType::U32 })
        );
        assert_eq!(
            decode_registers(&[0], DataType::Bool, WordOrder::ABCD, None).unwrap(),
            Value::Bool(false)
        );
        assert_eq!(
            decode_registers(&[0x0100], DataType::Bool, WordOrder::ABCD, None).unwrap(),
            Value::Bool(true)
        );
        assert_eq!(decode_bit(&[true]).unwrap(), Value::Bool(true));
        assert_eq!(decode_bit(&[]), Err(CodecError::BitCount { got: 0 }));
        assert_eq!(
            decode_bit(&[true, false]),
            Err(CodecError::BitCount { got: 2 })
        );
        assert!(encode_bit(&Value::Bool(true)).unwrap());
        assert!(!encode_bit(&Value::UInt(0)).unwrap());
        assert!(encode_bit(&Value::Float(1.0)).unwrap());
        assert!(matches!(
            encode_bit(&Value::UInt(2)),
            Err(CodecError::NotBool { .. })
        ));
        assert!(matches!(
            encode_bit(&Value::Str("on".into())),
            Err(CodecError::WrongKind { .. })
        ));
        assert_eq!(
            encode_point(
                &Value::Bool(true),
                DataType::Bool,
                WordOrder::ABCD,
                1.0,
                0.0,
                0,
                Some(3)
            ),
            Err(CodecError::BitWrite { bit: 3 })
        );
        assert_eq!(
            encode_point(
                &Value::Bool(true),
                DataType::Bool,
                WordOrder::ABCD,
                1.0,
                0.0,
                0,
                None
            )
            .unwrap(),
            [1]
        );
        assert_eq!(set_bit(0, 3, true).unwrap(), 8);
        assert_eq!(set_bit(0xFFFF, 15, false).unwrap(), 0x7FFF);
        assert!(set_bit(0, 16, true).is_err());
    }

    #[test]
    fn width_mismatch() {
        assert_eq!(
            decode_registers(&[1], DataType::U32, WordOrder::ABCD, None),
            Err(CodecError::WidthMismatch {
                ty: DataType::U32,
                expected: 2,
                got: 1
            })
        );
        assert!(decode_registers(&[], DataType::U16, WordOrder::ABCD, None).is_err());
        assert!(decode_registers(&[1, 2, 3], DataType::F64, WordOrder::ABCD, None).is_err());
    }

    #[test]
    fn strings() {
        // "AB" "C\0" high byte first.
        let regs = [0x4142, 0x4300, 0x0000];
        assert_eq!(
            decode_registers(&regs, DataType::String, WordOrder::ABCD, None).unwrap(),
            Value::Str("ABC".into())
        );
        assert_eq!(
            decode_registers(&regs, DataType::String, WordOrder::CDAB, None).unwrap(),
            Value::Str("ABC".into())
        );
        let swapped = [0x4241, 0x0043];
        assert_eq!(
            decode_registers(&swapped, DataType::String, WordOrder::BADC, None).unwrap(),
            Value::Str("ABC".into())
        );
        // Trailing spaces and NULs trimmed, interior kept.
        let padded = [0x4120, 0x4220, 0x2000];
        assert_eq!(
            decode_registers(&padded, DataType::String, WordOrder::ABCD, None).unwrap(),
            Value::Str("A B".into())
        );
        // Invalid UTF-8 is replaced, not an error.
        assert_eq!(
            decode_registers(&[0xFF41], DataType::String, WordOrder::ABCD, None).unwrap(),
            Value::Str("\u{FFFD}A".into())
        );
        assert_eq!(
            decode_registers(&[], DataType::String, WordOrder::ABCD, None).unwrap(),
            Value::Str(String::new())
        );
        assert_eq!(
            encode_registers(
                &Value::Str("ABC".into()),
                DataType::String,
                WordOrder::ABCD,
                1.0,
                0.0,
                3
            )
            .unwrap(),
            [0x4142, 0x4300, 0]
        );
        assert_eq!(
            encode_registers(
                &Value::Str("ABCDE".into()),
                DataType::String,
                WordOrder::ABCD,
                1.0,
                0.0,
                2
            ),
            Err(CodecError::StringTooLong { bytes: 5, regs: 2 })
        );
        assert!(matches!(
            encode_registers(
                &Value::UInt(1),
                DataType::String,
                WordOrder::ABCD,
                1.0,
                0.0,
                2
            ),
            Err(CodecError::WrongKind { .. })
        ));
    }

    #[test]
    fn scaling() {
        assert_eq!(apply_scale(Value::UInt(5), 1.0, 0.0), Value::UInt(5));
        assert_eq!(apply_scale(Value::UInt(5), 0.5, 1.0), Value::Float(3.5));
        assert_eq!(apply_scale(Value::Int(-4), 2.0, 0.0), Value::Float(-8.0));
        assert_eq!(apply_scale(Value::Bool(true), 2.0, 1.0), Value::Bool(true));
        assert_eq!(
            apply_scale(Value::Str("x".into()), 2.0, 1.0),
            Value::Str("x".into())
        );
        // 23.4 / 0.1 is 233.99999999999997 in f64: rounded to 234.
        let regs = encode_registers(
            &Value::Float(23.4),
            DataType::U16,
            WordOrder::ABCD,
            0.1,
            0.0,
            0,
        )
        .unwrap();
        assert_eq!(regs, [234]);
        let back = apply_scale(
            decode_registers(&regs, DataType::U16, WordOrder::ABCD, None).unwrap(),
            0.1,
            0.0,
        );
        assert!((back.as_f64().unwrap() - 23.4).abs() < 1e-9);
        // Offset and negative scale.
        let regs = encode_registers(
            &Value::Float(-10.0),
            DataType::I16,
            WordOrder::ABCD,
            -2.0,
            0.0,
            0,
        )
        .unwrap();
        assert_eq!(regs, [5]);
        let regs = encode_registers(
            &Value::Int(-40),
            DataType::U16,
            WordOrder::ABCD,
            1.0,
            -40.0,
            0,
        )
        .unwrap();
        assert_eq!(regs, [0]);
        // Non-integral after unscale.
        assert!(matches!(
            encode_registers(
                &Value::Float(23.45),
                DataType::U16,
                WordOrder::ABCD,
                0.1,
                0.0,
                0
            ),
            Err(CodecError::NotIntegral { .. })
        ));
        assert!(matches!(
            enc(Value::Float(2.5), DataType::U16, WordOrder::ABCD),
            Err(CodecError::NotIntegral { .. })
        ));
        // Bad scale.
        assert!(matches!(
            encode_registers(
                &Value::Float(1.0),
                DataType::U16,
                WordOrder::ABCD,
                0.0,
                0.0,
                0
            ),
            Err(CodecError::BadScaling { .. })
        ));
        assert!(matches!(
            encode_registers(
                &Value::Float(1.0),
                DataType::F32,
                WordOrder::ABCD,
                f64::NAN,
                0.0,
                0
            ),
            Err(CodecError::BadScaling { .. })
        ));
        // Floats get the unscaled value.
        let regs = encode_registers(
            &Value::Float(3.0),
            DataType::F32,
            WordOrder::ABCD,
            2.0,
            1.0,
            0,
        )
        .unwrap();
        assert_eq!(regs, [0x3F80, 0]);
    }

    #[test]
    fn out_of_range_and_wrong_kinds() {
        let ooru = |v, ty| {
            matches!(
                enc(v, ty, WordOrder::ABCD),
                Err(CodecError::OutOfRange { .. })
            )
        };
        assert!(ooru(Value::UInt(70_000), DataType::U16));
        assert!(ooru(Value::Float(70_000.0), DataType::U16));
        assert!(ooru(Value::Int(-1), DataType::U32));
        assert!(ooru(Value::Int(-1), DataType::U64));
        assert!(ooru(Value::UInt(0x8000), DataType::I16));
        assert!(ooru(Value::Int(-32_769), DataType::I16));
        assert!(ooru(Value::UInt(u64::MAX), DataType::I64));
        assert!(ooru(Value::Float(1e30), DataType::I64));
        assert!(ooru(Value::Float(TWO_POW_64), DataType::U64));
        assert!(ooru(Value::Float(-1e300), DataType::I64));
        assert_eq!(
            enc(Value::UInt(u64::MAX), DataType::U64, WordOrder::ABCD).unwrap(),
            [0xFFFF; 4]
        );
        assert_eq!(
            enc(Value::Int(i64::MIN), DataType::I64, WordOrder::ABCD).unwrap(),
            [0x8000, 0, 0, 0]
        );
        assert!(matches!(
            enc(Value::Float(f64::NAN), DataType::U16, WordOrder::ABCD),
            Err(CodecError::NotFinite { .. })
        ));
        assert!(matches!(
            enc(Value::Float(f64::INFINITY), DataType::I32, WordOrder::ABCD),
            Err(CodecError::NotFinite { .. })
        ));
        assert_eq!(
            enc(Value::Float(1e40), DataType::F32, WordOrder::ABCD),
            Err(CodecError::FloatOverflow { raw: 1e40 })
        );
        assert_eq!(
            enc(Value::Float(f64::INFINITY), DataType::F32, WordOrder::ABCD).unwrap(),
            [0x7F80, 0]
        );
        let nan = enc(Value::Float(f64::NAN), DataType::F32, WordOrder::ABCD).unwrap();
        assert!(decode_registers(&nan, DataType::F32, WordOrder::ABCD, None)
            .unwrap()
            .as_f64()
            .unwrap()
            .is_nan());
        assert!(matches!(
            enc(Value::Str("1".into()), DataType::U16, WordOrder::ABCD),
            Err(CodecError::WrongKind { .. })
        ));
        assert!(matches!(
            enc(Value::Bool(true), DataType::U16, WordOrder::ABCD),
            Err(CodecError::WrongKind { .. })
        ));
        assert!(matches!(
            enc(Value::Bool(true), DataType::F64, WordOrder::ABCD),
            Err(CodecError::WrongKind { .. })
        ));
        assert!(matches!(
            enc(Value::UInt(2), DataType::Bool, WordOrder::ABCD),
            Err(CodecError::NotBool { .. })
        ));
        // Messages say what and why.
        let msg = enc(Value::UInt(70_000), DataType::U16, WordOrder::ABCD)
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "raw value 70000 (after undoing scale/offset) is out of range for u16: allowed 0 to 65535"
        );
    }

    #[test]
    fn type_helpers_and_serde() {
        assert_eq!(DataType::String.width(7), 7);
        assert_eq!(DataType::F64.width(7), 4);
        assert_eq!(DataType::I32.int_bits(), Some(32));
        assert_eq!(DataType::F32.int_bits(), None);
        assert!(DataType::U64.is_integer());
        assert!(!DataType::Bool.is_integer());
        assert!(Table::Coil.is_bit() && Table::Discrete.is_bit());
        assert!(!Table::Holding.is_bit() && !Table::Input.is_bit());
        for t in [Table::Holding, Table::Input, Table::Coil, Table::Discrete] {
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
            assert_eq!(serde_json::from_str::<Table>(&json).unwrap(), t);
        }
        for ty in TYPES {
            let json = serde_json::to_string(&ty).unwrap();
            assert_eq!(json, format!("\"{}\"", ty.as_str()));
            assert_eq!(serde_json::from_str::<DataType>(&json).unwrap(), ty);
        }
        for o in ORDERS {
            let json = serde_json::to_string(&o).unwrap();
            assert_eq!(json, format!("\"{}\"", o.as_str()));
            assert_eq!(serde_json::from_str::<WordOrder>(&json).unwrap(), o);
        }
        assert_eq!(WordOrder::default(), WordOrder::ABCD);
        assert!(serde_json::from_str::<WordOrder>("\"abcd\"").is_err());
        let vals = [
            (Value::Bool(true), "true"),
            (Value::UInt(7), "7"),
            (Value::Int(-7), "-7"),
            (Value::Float(1.5), "1.5"),
            (Value::Str("hi".into()), "\"hi\""),
        ];
        for (v, json) in vals {
            assert_eq!(serde_json::to_string(&v).unwrap(), json);
            assert_eq!(serde_json::from_str::<Value>(json).unwrap(), v);
        }
        assert_eq!(Value::Int(-3).as_f64(), Some(-3.0));
        assert_eq!(Value::Bool(true).as_f64(), None);
        assert_eq!(Value::Int(-3).as_u64(), None);
        assert_eq!(Value::Int(3).as_u64(), Some(3));
        assert_eq!(Value::Float(3.0).as_u64(), Some(3));
        assert_eq!(Value::Float(3.5).as_u64(), None);
        assert_eq!(Value::Float(TWO_POW_64).as_u64(), None);
        assert_eq!(Value::Str("3".into()).as_u64(), None);
    }

    fn f32_no_nan() -> impl Strategy<Value = f32> {
        use proptest::num::f32::*;
        POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO | INFINITE
    }

    fn f64_no_nan() -> impl Strategy<Value = f64> {
        use proptest::num::f64::*;
        POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO | INFINITE
    }

    proptest! {
        #[test]
        fn roundtrip_u16(x: u16, o in order()) {
            prop_assert_eq!(roundtrip(Value::UInt(x.into()), DataType::U16, o, 0), Value::UInt(x.into()));
        }

        #[test]
        fn roundtrip_i16(x: i16, o in order()) {
            prop_assert_eq!(roundtrip(Value::Int(x.into()), DataType::I16, o, 0), Value::Int(x.into()));
        }

        #[test]
        fn roundtrip_u32(x: u32, o in order()) {
            prop_assert_eq!(roundtrip(Value::UInt(x.into()), DataType::U32, o, 0), Value::UInt(x.into()));
        }

        #[test]
        fn roundtrip_i32(x: i32, o in order()) {
            prop_assert_eq!(roundtrip(Value::Int(x.into()), DataType::I32, o, 0), Value::Int(x.into()));
        }

        #[test]
        fn roundtrip_u64(x: u64, o in order()) {
            prop_assert_eq!(roundtrip(Value::UInt(x), DataType::U64, o, 0), Value::UInt(x));
        }

        #[test]
        fn roundtrip_i64(x: i64, o in order()) {
            prop_assert_eq!(roundtrip(Value::Int(x), DataType::I64, o, 0), Value::Int(x));
        }

        #[test]
        fn roundtrip_f32(x in f32_no_nan(), o in order()) {
            let v = Value::Float(f64::from(x));
            let back = roundtrip(v.clone(), DataType::F32, o, 0);
            prop_assert_eq!(back.as_f64().map(f64::to_bits), v.as_f64().map(f64::to_bits));
        }

        #[test]
        fn roundtrip_f64(x in f64_no_nan(), o in order()) {
            let back = roundtrip(Value::Float(x), DataType::F64, o, 0);
            prop_assert_eq!(back.as_f64().map(f64::to_bits), Some(x.to_bits()));
        }

        #[test]
        fn roundtrip_nan(o in order(), wide: bool) {
            let ty = if wide { DataType::F64 } else { DataType::F32 };
            let back = roundtrip(Value::Float(f64::NAN), ty, o, 0);
            prop_assert!(back.as_f64().is_some_and(f64::is_nan));
        }

        #[test]
        fn roundtrip_bool(b: bool, o in order()) {
            prop_assert_eq!(roundtrip(Value::Bool(b), DataType::Bool, o, 0), Value::Bool(b));
        }

        #[test]
        fn roundtrip_string(
            (len, s) in (0u16..20).prop_flat_map(|len| {
                (Just(len), proptest::string::string_regex(&format!("([ -~]{{0,{}}}[!-~])?", (usize::from(len) * 2).saturating_sub(1))).unwrap())
            }),
            o in order(),
        ) {
            prop_assume!(s.len() <= usize::from(len) * 2);
            prop_assert_eq!(roundtrip(Value::Str(s.clone()), DataType::String, o, len), Value::Str(s));
        }

        #[test]
        fn roundtrip_scaled_ints(raw: i16, o in order(), scale in prop::sample::select(vec![0.1, 0.01, 0.5, 2.0, -10.0, 1.0]), offset in prop::sample::select(vec![0.0, -40.0, 273.15])) {
            let eng = apply_scale(Value::Int(raw.into()), scale, offset);
            let regs = encode_registers(&eng, DataType::I16, o, scale, offset, 0).unwrap();
            prop_assert_eq!(decode_registers(&regs, DataType::I16, o, None).unwrap(), Value::Int(raw.into()));
        }

        #[test]
        fn decode_never_panics(
            regs in prop::collection::vec(any::<u16>(), 0..10),
            ty in prop::sample::select(TYPES.to_vec()),
            o in order(),
            bit in proptest::option::of(any::<u8>()),
        ) {
            let _ = decode_registers(&regs, ty, o, bit);
        }

        #[test]
        fn decode_bit_never_panics(bits in prop::collection::vec(any::<bool>(), 0..4)) {
            let _ = decode_bit(&bits);
        }

        #[test]
        fn encode_never_panics(
            v in prop_oneof![
                any::<bool>().prop_map(Value::Bool),
                any::<u64>().prop_map(Value::UInt),
                any::<i64>().prop_map(Value::Int),
                any::<f64>().prop_map(Value::Float),
                ".{0,12}".prop_map(Value::Str),
            ],
            ty in prop::sample::select(TYPES.to_vec()),
            o in order(),
            scale in any::<f64>(),
            offset in any::<f64>(),
            len in 0u16..8,
        ) {
            if let Ok(regs) = encode_registers(&v, ty, o, scale, offset, len) {
                prop_assert_eq!(regs.len(), usize::from(ty.width(len)));
            }
        }

        #[test]
        fn out_of_range_rejected(x in 65_536u64.., y in i64::MIN..0) {
            prop_assert!(enc(Value::UInt(x), DataType::U16, WordOrder::ABCD).is_err());
            prop_assert!(enc(Value::Int(y), DataType::U32, WordOrder::ABCD).is_err());
            prop_assert!(enc(Value::Int(y), DataType::U16, WordOrder::ABCD).is_err());
            prop_assert!(enc(Value::Int(y), DataType::U64, WordOrder::ABCD).is_err());
        }
    }
}
