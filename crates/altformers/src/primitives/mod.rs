//! Small maths shared by several mixers. The sequence-mixing mechanisms themselves, each with
//! its reference, CPU and CUDA forms, are in [`crate::ops`].

pub mod rotary;
