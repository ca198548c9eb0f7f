//! Shared maths used by several mixers, each with the plainest correct form beside it.

pub mod causal_softmax;
pub mod decayed;
pub mod fftconv;
pub mod rotary;
