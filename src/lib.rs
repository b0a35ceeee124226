//! chainsight: a customer-insight exchange for the companies of one supply
//! chain. Each company runs a node; retailers publish end-customer events,
//! the node anonymises them at the edge, stores them durably in sled and (in
//! later work) forwards them upstream over mutual TLS to the producers whose
//! products they concern.

#![forbid(unsafe_code)]

pub mod admin;
pub mod anonymise;
pub mod audit;
pub mod bench;
pub mod certs;
pub mod chain;
pub mod chart;
pub mod client;
pub mod config;
pub mod conversions;
pub mod demo;
pub mod domain;
pub mod dp;
pub mod erasure;
pub mod export;
pub mod fuzzing;
pub mod insights;
pub mod metrics;
pub mod node;
pub mod origin;
pub mod pb;
pub mod policy;
pub mod propagate;
pub mod reload;
pub mod retention;
pub mod rollup;
pub mod secret;
pub mod service;
pub mod store;
pub mod tls;
pub mod wire;
pub mod workload;
