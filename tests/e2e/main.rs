//! End-to-end tests: a real vault server on 127.0.0.1:0 over a real SQLite
//! file in a temporary data directory, driven through the SDK (and, where
//! the SDK cannot express a request, through raw gRPC). Tests that need a
//! process to kill or a log to read run the real `ordervault` binary.

#![allow(missing_docs, clippy::unwrap_used)]

mod admin;
mod audit;
mod bad_input;
mod binary;
mod flow;
mod postgres;
mod stories;
mod support;
