//! Integration tests: the real pipeline against floorgate's simulators and a real mosquitto.
#![allow(clippy::unwrap_used, unreachable_pub, missing_debug_implementations)]

mod support;

mod config;
mod daemon;
mod packaging;
mod pipeline;
mod resilience;
mod schema;
