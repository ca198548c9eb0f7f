//! altformers: the Transformer and the architectures proposed to replace it, implemented
//! against one contract ([`mixers::SequenceMixer`]), trained and measured on equal footing.

pub mod backbones;
pub mod bench;
pub mod channel_mixers;
pub mod compare;
pub mod complexity;
pub mod config;
pub mod cpu;
pub mod data;
pub mod decoder;
pub mod device;
pub mod generate;
pub mod import;
pub mod interop;
pub mod kernels;
pub mod mixers;
pub mod model;
pub mod nn;
pub mod ops;
pub mod params;
pub mod primitives;
pub mod registry;
pub mod report;
pub mod results;
pub mod rng;
pub mod testing;
pub mod train;
pub mod util;
