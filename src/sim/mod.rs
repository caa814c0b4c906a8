//! Device simulators: simulated Modbus devices (bag dispensers, charging
//! cabinets) served over Modbus TCP, RTU on a pseudo-terminal or RTU on a
//! serial port, with run-time fault injection and day/night behaviour models.
//!
//! Quick start: [`SimFloor::tcp`] / [`SimFloor::pty`]; lower level:
//! [`Device`] + [`serve_tcp`] / [`Pty::open`] + [`serve_rtu`] +
//! [`Model::init`] + [`run_model`].

pub mod bag;
mod bank;
pub mod broker;
pub mod cabinet;
mod device;
mod floor;
pub mod generic;
mod model;
mod pty;
mod rtu;
mod tcp;
#[cfg(test)]
mod tests;

pub use bank::{RegisterBank, Tables, DEFAULT_TABLE_SIZE};
pub use device::{
    Device, Faults, Op, Reply, EX_GATEWAY_TARGET, EX_ILLEGAL_ADDRESS, EX_ILLEGAL_FUNCTION,
    EX_ILLEGAL_VALUE, EX_SERVER_FAILURE,
};
pub use floor::SimFloor;
pub use model::{run_model, traffic_factor, Model, Tick, TimeScale, NIGHT_FACTOR, TICK};
pub use pty::Pty;
pub use rtu::{
    crc16, crc_ok, decode_request, encode_reply, push_crc, serve_rtu, serve_rtu_path,
    serve_rtu_with, LineTiming, RtuOptions,
};
pub use tcp::serve_tcp;
