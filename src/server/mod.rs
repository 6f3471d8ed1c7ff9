//! The vhost-user-blk server.

pub mod config;
pub mod request;
