//! floorgate: the edge gateway of a hospital floor. Polls Modbus RTU/TCP devices, derives events,
//! keeps them durably until the broker acknowledged them, and forwards them over TLS MQTT.
//!
//! Data flows one way: [`bus`] → [`device`] → [`event`] → [`store`] → [`uplink`], wired by
//! [`daemon`]; [`config`] and [`cli`] sit on the side.

pub mod bus;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod device;
pub mod event;
pub mod memory;
pub mod metrics;
pub mod remote;
pub mod sim;
pub mod store;
pub mod systemd;
pub mod timer;
pub mod uplink;
