//! ordervault — a privacy vault for e-commerce order data.
//!
//! Services hand the vault names, phones, addresses, ID numbers and order
//! details and get tokens back; couriers, suppliers, support desks and
//! analytics keep only tokens. The vault reveals a value only to a role
//! whose policy allows it, for a stated purpose, and writes every decision
//! to a tamper-evident audit log before answering.
//!
//! # Map
//!
//! | module | owns |
//! |---|---|
//! | [`crypto`] | AEAD envelope, HKDF derivation, fingerprints, key wrap — pure functions |
//! | [`keyring`] | master key custody, data-key versions, per-kind subkeys, usage counters |
//! | [`kinds`] | field kinds: normalise, mask, token prefix |
//! | [`token`] | the token format |
//! | [`policy`] | roles, purposes, visibility per kind, permissions |
//! | [`audit`] | event model, canonical leaves, hash chain, verification |
//! | [`store`] | the [`store::Store`] trait and its SQLite backend with group commit |
//! | [`engine`] | the decisions: tokenize, reveal, authenticate |
//! | [`service`] | gRPC ↔ domain types, the one error → status mapping |
//! | [`admin`] | key rotation, rewrap and retirement, auto-rotation at the cap, policy reload, status |
//! | [`service_admin`] | `AdminService`: the operator's RPCs |
//! | [`cli_admin`] | the operator's subcommands (over gRPC) and the offline `keys rotate-master`, `policy check` |
//! | [`server`] | the tonic server with health and reflection |
//! | [`setup`] | initialising and opening a data directory |
//! | [`cli`] | the `ordervault` subcommands |
//!
//! # A Tokenize, step by step
//!
//! [`service`] authenticates the API key ([`engine::Engine::authenticate`]),
//! parses kinds and moves values into wiped buffers → [`engine`] checks the
//! role may tokenize, normalises every field ([`kinds`]) before doing any
//! work (all or nothing), fingerprints them ([`keyring`]), reuses existing
//! tokens for deterministic kinds, claims encryptions under the primary key,
//! encrypts with the token id bound into the associated data ([`crypto`]) →
//! [`store`] commits tokens, order and audit event in one group commit →
//! the reply carries tokens only.
//!
//! # A Reveal, step by step
//!
//! [`service`] authenticates and parses tokens → [`engine`] checks the
//! purpose against the role ([`policy`]), loads the token rows, decides per
//! field (plain, masked, denied), decrypts only what may be shown → the
//! audit events are committed durably ([`audit`], [`store`]) → only then is
//! the reply built. If the audit write fails, the request fails and nothing
//! is revealed.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod auditor;
pub mod bench;
pub mod bench_audit;
pub mod checkpoint;
pub mod cli;
pub mod cli_admin;
pub mod cli_audit;
pub mod cli_grants;
pub mod crypto;
pub mod engine;
pub mod error;
pub mod evidence;
pub mod guard;
pub mod keyring;
pub mod kinds;
pub mod merkle;
pub mod policy;
pub mod server;
pub mod service;
pub mod service_admin;
pub mod service_audit;
pub mod setup;
pub mod store;
pub mod token;
