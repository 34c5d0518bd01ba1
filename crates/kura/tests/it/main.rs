//! Integration tests: the real `kura` binary against real directories, real processes killed
//! with SIGKILL, really corrupted bytes and a really full filesystem.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod badinput;
mod corruption;
mod crash;
mod database;
mod drill;
mod faultproxy;
mod generations;
mod pg;
mod pull;
mod report;
mod roundtrip;
mod s3;
mod server;
mod shadow;
mod sqlite_shadow;
mod topology;
mod util;
