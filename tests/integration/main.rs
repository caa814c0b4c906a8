//! Integration tests: the real pipeline against floorgate's simulators and a real mosquitto.
#![allow(clippy::unwrap_used)]

mod support;

mod config;
mod schema;
