//! One module per command family; each turns parsed arguments into library options, runs the
//! operation and prints the result.

pub mod backup;
pub mod copy;
pub mod info;
pub mod key;
pub mod pg;
pub mod plan;
pub mod repair;
pub mod restore;
pub mod retain;
pub mod serve;
pub mod shadow;
pub mod status;
