//! Fuzz target: register decoders never panic on any registers, type, order or bit.
#![no_main]
use floorgate::device::codec::{decode_registers, DataType, WordOrder};
use libfuzzer_sys::fuzz_target;

const TYPES: [DataType; 10] = [
    DataType::U16, DataType::I16, DataType::U32, DataType::I32, DataType::U64,
    DataType::I64, DataType::F32, DataType::F64, DataType::Bool, DataType::String,
];
const ORDERS: [WordOrder; 4] = [WordOrder::ABCD, WordOrder::CDAB, WordOrder::BADC, WordOrder::DCBA];

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let ty = TYPES[data[0] as usize % TYPES.len()];
    let order = ORDERS[(data[0] as usize / 16) % 4];
    let bit = (data[1] < 32).then_some(data[1]);
    let regs: Vec<u16> = data[2..].chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])).collect();
    let _ = decode_registers(&regs, ty, order, bit);
});
