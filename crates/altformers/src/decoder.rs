//! Decoding one token per sequence at a time, after a prefill: the model's recurrent step,
//! run eagerly or replayed from a CUDA graph.
//!
//! A decoding step of a small model is hundreds of tiny kernels; launched one by one from
//! the host, the step costs the launches, not the arithmetic (an RWKV-4 of 12 x 768 is
//! 2 x 10^8 FLOP and 185 MB of weights a token: tens of microseconds of H200 time). Where the
//! step is static ([`Model::static_step`]: the same kernels on the same shapes at every
//! position), it is captured once as a CUDA graph, with its state in buffers of fixed
//! address that the graph reads and overwrites, and every token is then one graph launch
//! (the token copied in, the logits read out). Elsewhere, and on the CPU, the step runs
//! eagerly (also, with a warning, where a capture fails). Both give the same logits
//! (tests/cuda/decoder.rs).
use candle_core::{Result, Tensor};

use crate::backbones::ModelState;
use crate::model::Model;

pub struct Decoder<'m> {
    model: &'m Model,
    state: ModelState,
    #[cfg(feature = "cuda")]
    graph: Option<graph::Captured>,
}

impl<'m> Decoder<'m> {
    /// Decodes from `state` (a prefill's), `batch` sequences; replays a CUDA graph where the
    /// model and device allow, unless switched off (`ALTFORMERS_UNFUSED=decode-graph`).
    pub fn new(model: &'m Model, state: ModelState, batch: usize) -> Result<Self> {
        // a state at the end of the window takes no step (generation re-prefills it)
        let room = model.window().is_none_or(|w| state.pos < w);
        #[cfg(feature = "cuda")]
        if model.device().is_cuda() && model.static_step() && room && crate::kernels::enabled("decode-graph") {
            // a capture that ran out of memory is tried once more with the pool's cached
            // blocks returned to the driver (a large prefill before it leaves them cached)
            let captured = graph::Captured::new(model, &state, batch).or_else(|e| {
                if !format!("{e}").contains("OUT_OF_MEMORY") {
                    return Err(e);
                }
                crate::device::release_cached_memory(model.device())?;
                graph::Captured::new(model, &state, batch)
            });
            match captured {
                Ok((captured, buffers)) => return Ok(Self { model, state: buffers, graph: Some(captured) }),
                // decoding still works, op by op: say so rather than fail the generation
                // (the first line: candle's error carries a backtrace after it)
                Err(e) => eprintln!(
                    "warning: the decoding step could not be captured as a CUDA graph ({}); it runs op by op",
                    e.to_string().lines().next().unwrap_or_default()
                ),
            }
        }
        let _ = (batch, room);
        Ok(Self::eager(model, state))
    }

    /// Decodes from `state` op by op, never capturing a graph (for a state used for a step or
    /// two, where a capture would cost more than it saves).
    pub fn eager(model: &'m Model, state: ModelState) -> Self {
        Self {
            model,
            state,
            #[cfg(feature = "cuda")]
            graph: None,
        }
    }

    /// Whether the steps are replayed from a CUDA graph.
    pub fn replays(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.graph.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// One token per sequence (`tokens`: one id per sequence) -> logits `[B, V]`.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.graph {
            // the eager step checks these itself; the graph cannot
            if let Some(w) = self.model.window().filter(|&w| self.state.pos >= w) {
                candle_core::bail!("decoder: position {} is beyond the model's window of {w} tokens", self.state.pos);
            }
            let limit = crate::mixers::MAX_DEVICE_POSITION;
            if self.state.pos >= limit {
                candle_core::bail!(
                    "decoder: position {} is beyond the {limit} a step's f32 position counts exactly",
                    self.state.pos
                );
            }
            // a copy: the graph's output buffer is overwritten by the next replay (one
            // device-to-device copy of B x V values, a few microseconds)
            let logits = g.replay(tokens)?.copy()?;
            self.state.pos += 1;
            for layer in self.state.layers.iter_mut() {
                layer.pos += 1;
            }
            return Ok(logits);
        }
        let token = Tensor::new(tokens, self.model.device())?;
        self.model.step(&token, &mut self.state)
    }

    /// The state after the tokens stepped so far.
    pub fn state(&self) -> &ModelState {
        &self.state
    }
}

#[cfg(feature = "cuda")]
mod graph {
    use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use candle_core::cuda_backend::cudarc::driver::{result, CudaGraph};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{bail, DType, Device, Result, Tensor};

    use crate::backbones::ModelState;
    use crate::kernels::launch;
    use crate::model::Model;

    /// One captured step: the token buffer it reads, the state buffers it reads and
    /// overwrites, the logits buffer it writes.
    pub struct Captured {
        graph: CudaGraph,
        dev: CudaDevice,
        token: Tensor,
        logits: Tensor,
    }

    impl Captured {
        /// Captures one step of `model` for `batch` sequences; returns it and the state whose
        /// buffers it updates in place (a copy of `state`, fresh contiguous buffers).
        pub fn new(model: &Model, state: &ModelState, batch: usize) -> Result<(Self, ModelState)> {
            let Device::Cuda(dev) = model.device() else { bail!("decoder: CUDA graphs need a CUDA device") };
            let dev = dev.clone();
            // one stream, no cross-stream events: an event recorded before the capture and
            // waited on inside it would break the capture. Off for the rest of the process
            // (cudarc's tracking orders work across streams; candle and this crate's kernels,
            // cuFFT included, all run on the device's one stream, so nothing relies on it).
            // SAFETY: as above, every operation runs on the one stream.
            unsafe { dev.disable_event_tracking() };
            // candle uploads the dims and strides of strided operations: the warm-up step
            // caches them on the device, and the capture reuses them
            let _cache = dev.enable_cuda_graph_htod_cache();
            let token = Tensor::zeros(batch, DType::U32, model.device())?;
            // warm-up, eager: loads every kernel, fills the cache, and shows the state's shapes
            let mut warm = state.clone();
            let warm_logits = model.step(&token, &mut warm)?;
            // every state tensor's shape and dtype, each layer's apart
            type Shape = (Vec<usize>, DType);
            let shapes = |s: &ModelState| -> (Vec<Vec<Shape>>, Option<Shape>) {
                let of = |t: &Tensor| (t.dims().to_vec(), t.dtype());
                (s.layers.iter().map(|l| l.tensors.iter().map(of).collect()).collect(), s.position.as_ref().map(of))
            };
            if shapes(&warm) != shapes(state) {
                bail!(
                    "decoder: the step of `{}` changes its state's shapes: it cannot be replayed",
                    model.config.architecture
                );
            }
            drop(warm);
            let mut buffers = state.clone();
            for t in buffers.tensors_mut() {
                *t = t.contiguous()?.copy()?;
            }
            let logits = warm_logits.zeros_like()?;
            drop(warm_logits);
            model.device().synchronize()?;
            let stream = dev.cuda_stream();
            stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).w()?;
            let body = || -> Result<()> {
                let mut s = buffers.clone();
                let out = model.step(&token, &mut s)?;
                launch::copy_into(&dev, "decoder", &logits, &out)?;
                for (dst, src) in buffers.tensors().zip(s.tensors()) {
                    launch::copy_into(&dev, "decoder", dst, src)?;
                }
                Ok(())
            };
            let captured = body();
            // end the capture whatever happened, so the stream works again
            let graph =
                stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH).w();
            captured?;
            let Some(graph) = graph? else { bail!("decoder: the captured step is empty") };
            graph.upload().w()?;
            Ok((Self { graph, dev, token, logits }, buffers))
        }

        /// Copies `tokens` in, launches the step, returns the logits buffer.
        pub fn replay(&self, tokens: &[u32]) -> Result<Tensor> {
            if tokens.len() != self.token.elem_count() {
                bail!("decoder: {} tokens for a graph of {} sequences", tokens.len(), self.token.elem_count());
            }
            let stream = self.dev.cuda_stream();
            launch::with_addresses(&self.dev, "decoder", &[Some(&self.token)], |a| {
                // SAFETY: the token buffer holds tokens.len() u32; the copy is from pageable
                // memory, so it completes before the call returns.
                unsafe { result::memcpy_htod_async(a[0], tokens, stream.cu_stream()) }.w()?;
                Ok(())
            })?;
            self.graph.launch().w()?;
            Ok(self.logits.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::model::Model;
    use crate::testing::tiny_config;
    use candle_core::{DType, Device};

    /// Which models' steps are replayable: RWKV-4's, RetNet's (its position read from its
    /// state's tensor), AFT-simple's and Performer's (their learned positions read at the
    /// state's device position); not those whose cache grows (the Transformer's, AFT-full's).
    #[test]
    fn static_steps_are_the_recurrent_models_without_host_positions() -> anyhow::Result<()> {
        for (arch, replayable) in [
            ("rwkv4", true),
            ("retnet", true),
            ("aft-simple", true),
            ("performer", true),
            ("aft-local", true),
            ("aft-conv", true),
            ("transformer", false),
            ("aft-full", false),
        ] {
            let model = Model::new(&tiny_config(arch, &[])?, 1, &Device::Cpu, DType::F32)?;
            assert_eq!(model.static_step(), replayable, "{arch}");
        }
        Ok(())
    }

    /// What a CUDA graph's capture needs of a static step, checked on the CPU for every model
    /// that says its step is static, at a batch of 3, from a prefill shorter than any window
    /// and from a longer one: the state keeps its shapes and dtypes, and every tensor the step
    /// leaves in it is contiguous (the capture copies them into its buffers; a strided copy
    /// needs a layout the warm-up never uploaded: AFT-local's first replayed step failed so).
    #[test]
    fn static_steps_keep_one_contiguous_layout() -> anyhow::Result<()> {
        let layout = |s: &crate::backbones::ModelState| -> Vec<(Vec<usize>, DType)> {
            s.tensors().map(|t| (t.dims().to_vec(), t.dtype())).collect()
        };
        let mut checked = 0;
        for arch in crate::registry::ARCHITECTURES.iter().filter(|a| a.causal) {
            let cfg = tiny_config(arch.name, &["model.context=48"])?;
            let model = Model::new(&cfg, 1, &Device::Cpu, DType::F32)?;
            if !model.static_step() {
                continue;
            }
            for prompt in [2, 20] {
                let (_, mut state) = model.prefill(&crate::testing::random_tokens(3, prompt, cfg.vocab, 1)?)?;
                let before = layout(&state);
                for i in 0..3u32 {
                    model.step(&candle_core::Tensor::new(&[i, i + 1, i + 2], &Device::Cpu)?, &mut state)?;
                    assert_eq!(layout(&state), before, "{}: the step changed its state's shapes", arch.name);
                    for t in state.tensors() {
                        assert!(
                            t.is_contiguous(),
                            "{}: the step leaves a strided state tensor {:?}",
                            arch.name,
                            t.dims()
                        );
                    }
                }
            }
            checked += 1;
        }
        assert!(checked >= 6, "only {checked} models have static steps");
        Ok(())
    }
}
