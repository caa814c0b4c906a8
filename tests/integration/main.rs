//! Integration tests: the real pipeline against floorgate's simulators and a real mosquitto.
#![allow(clippy::unwrap_used, unreachable_pub, missing_debug_implementations)]

mod support;

mod check;
mod config;
mod daemon;
mod faults;
mod fleet;
mod operate;
mod packaging;
mod pipeline;
mod remote;
mod resilience;
mod scan;
mod schema;
mod setup;
