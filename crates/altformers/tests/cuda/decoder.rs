//! The CUDA-graph decoder (`altformers::decoder`) against eager steps of the same model: the
//! same logits token after token, batch of 3, f32 and bf16, RWKV-4, RetNet (whose step
//! reads its position from a device tensor), AFT-simple and Performer (learned
//! positions read at a device position), AFT-local (its bias read at a device position) and
//! AFT-conv (a window of fixed length); and a model whose KV cache grows is never replayed.

use altformers::decoder::Decoder;
use altformers::model::Model;
use altformers::testing::{self, device_rel_err, random_tokens, tiny_config};
use candle_core::{DType, Device, Tensor};

#[test]
fn replayed_steps_give_the_eager_logits() -> anyhow::Result<()> {
    let gpu = Device::new_cuda(0)?;
    // AFT-local/conv: a window of 16 after a prompt of 10, so the first replayed steps read a
    // window with empty entries, and the last ones a full window
    let window: &[&str] = &["model.options.window=16"];
    let models = [
        ("rwkv4", &[][..]),
        ("retnet", &[]),
        ("aft-simple", &[]),
        ("performer", &[]),
        ("aft-local", window),
        ("aft-conv", window),
    ];
    let cases = models.into_iter().flat_map(|(arch, sets)| [DType::F32, DType::BF16].map(move |d| (arch, sets, d)));
    for (arch, extra, dtype) in cases {
        let sets = [&["model.width=64", "model.context=48"][..], extra].concat();
        let cfg = tiny_config(arch, &sets)?;
        let model = Model::new(&cfg, 7, &gpu, dtype)?;
        testing::perturb(&model, 0.05, 2)?;
        let prompt = random_tokens(3, 10, cfg.vocab, 1)?.to_device(&gpu)?;
        let (_, state) = model.prefill(&prompt)?;
        let mut decoder = Decoder::new(&model, state.clone(), 3)?;
        anyhow::ensure!(decoder.replays(), "{arch}'s step is static: it should be replayed from a graph");
        let mut eager = state;
        let mut fed: Vec<Tensor> = Vec::new();
        let mut replayed: Vec<Tensor> = Vec::new();
        for i in 0..20u32 {
            let tokens: Vec<u32> = (0..3).map(|b| (i * 7 + b * 13) % cfg.vocab as u32).collect();
            let want = model.step(&Tensor::new(tokens.as_slice(), &gpu)?, &mut eager)?.to_dtype(DType::F32)?;
            let got = decoder.step(&tokens)?.to_dtype(DType::F32)?;
            let err = device_rel_err(&got, &want)?;
            anyhow::ensure!(
                err < 1e-6,
                "{arch} {dtype:?} step {i}: replayed logits differ from eager ones (rel err {err})"
            );
            fed.push(Tensor::new(tokens.as_slice(), &gpu)?.unsqueeze(1)?);
            replayed.push(got.unsqueeze(1)?);
        }
        // and the fused kernels themselves (every dtype the model runs in, bf16 parameters
        // included) against the parallel form over the same tokens
        let all = Tensor::cat(&[&prompt, &Tensor::cat(&fed, 1)?], 1)?;
        let parallel = model.forward(&all, None)?.narrow(1, 10, 20)?.to_dtype(DType::F32)?;
        let err = device_rel_err(&Tensor::cat(&replayed, 1)?, &parallel)?;
        let tol = if dtype == DType::F32 { 1e-4 } else { 5e-2 };
        anyhow::ensure!(err < tol, "{arch} {dtype:?}: replayed steps against the parallel form, rel err {err}");
        anyhow::ensure!(decoder.state().pos == 30, "the decoder's position: {}", decoder.state().pos);
        // the state the graph updated in place is the eager one
        for (a, b) in decoder.state().layers.iter().zip(&eager.layers) {
            for (x, y) in a.tensors.iter().zip(&b.tensors) {
                let err = device_rel_err(&x.to_dtype(DType::F32)?, &y.to_dtype(DType::F32)?)?;
                anyhow::ensure!(err < 1e-6, "{arch} {dtype:?}: replayed state differs (rel err {err})");
            }
        }
        // the KV cache grows every token: eager
        let transformer = Model::new(&tiny_config("transformer", &["model.context=48"])?, 1, &gpu, dtype)?;
        let (_, s) = transformer.prefill(&prompt)?;
        anyhow::ensure!(!Decoder::new(&transformer, s, 3)?.replays(), "a Transformer's step was replayed");
    }
    Ok(())
}
