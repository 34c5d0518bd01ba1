//! kura-ops
