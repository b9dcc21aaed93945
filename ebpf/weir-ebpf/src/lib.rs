//! The eBPF programs live in `main.rs` (built for `bpfel-unknown-none` by the
//! agent's build script). This library target exists so the agent can name the
//! crate as a build dependency and be rebuilt when it changes.
#![no_std]
