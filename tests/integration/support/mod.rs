//! Test support: a real mosquitto with generated certificates, and helpers to run floorgate.
#![allow(dead_code)]

pub mod broker;
