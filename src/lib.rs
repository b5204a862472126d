//! relay: private, outbound-only, durable connections between issue trackers.
//!
//! One binary plays two roles. The **node** is the public end: it initiates connections,
//! issues invitation codes, keeps per-connection queues and answers long-polls. The **agent**
//! is the private end behind a firewall: it redeems a code and from then on only dials out.
//! Both queue every payload in sled, so nothing is lost whatever crashes.
//!
//! # Layout
//!
//! - [`cli`]: argument parsing and the commands; `main` only calls it.
//! - [`config`]: settings from file, `RELAY_…` environment and flags, validated.
//! - [`invite`]: the invitation code, a pure codec.
//! - [`protocol`]: wire types, limits and version between agent and node (bincode).
//! - [`tls`]: server identity, the pinned client verifier, webhook trust, certificate facts.
//! - [`store`]: durable FIFO queues and record tables, over sled (with group commit) or PostgreSQL.
//! - [`http`]: the bounded server loop and the client with deadlines.
//! - [`proxy_auth`]: proxy authentication beyond Basic, client side: NTLM and Kerberos (Negotiate).
//! - [`guard`]: what the local listeners accept from browsers (`Host`, `Origin`,
//!   `Sec-Fetch-Site`, CORS for allowed origins), a pure decision.
//! - [`intake`]: the local API (`POST /v1/connections/{name}/messages`, health, metrics).
//! - [`deliver`]: the webhook worker (retry, dead letters).
//! - [`node`]: registry, agent-facing API and delivery on the public side.
//! - [`agent`]: accept, and the receive/send loops on the private side.
//! - [`admin`]: the local admin socket; [`daemon`]: starting either side.
//! - [`doctor`]: `relay doctor` and `relay egress`.
//! - [`sync`]: Script mode's pure core: replicas, the work-item model, sandboxed rules.
//! - [`tracker`]: the Azure DevOps REST client (version probe, backoff, work items, comments).
//! - [`notify`]: systemd readiness, status, watchdog and journal detection.
//! - [`retry`], [`shutdown`], [`status`], [`metrics`], [`error`], [`crypto`], [`fsutil`],
//!   [`names`], [`clock`]: small shared pieces. [`sink`]: a recording webhook; [`demo`]: `relay demo`;
//!   [`bench`]: `relay bench`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod agent;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod deliver;
pub mod demo;
pub mod doctor;
pub mod error;
pub mod fsutil;
pub mod guard;
pub mod http;
pub mod intake;
pub mod invite;
pub mod metrics;
pub mod names;
pub mod node;
pub mod notify;
pub mod protocol;
pub mod proxy_auth;
pub mod retry;
pub mod shutdown;
pub mod sink;
pub mod status;
pub mod store;
pub mod sync;
pub mod tls;
pub mod tracker;
