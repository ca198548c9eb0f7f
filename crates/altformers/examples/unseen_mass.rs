//! Diagnostic (not part of the suite): how much probability a trained byte-level model puts
//! on bytes that never occur in the training split, and the validation loss with the softmax
//! restricted to the bytes that do occur (what a character-level vocabulary would give).
//!   cargo run --release --example unseen_mass -- RUN_DIR
use altformers::data::{random_batch, Corpus, DataFormat};
use altformers::rng::Rng;
use altformers::train::load_run;
use candle_core::{DType, Device, Tensor, D};

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).expect("usage: unseen_mass RUN_DIR");
    let dev = Device::Cpu;
    let model = load_run(std::path::Path::new(&dir), &dev, DType::F32)?;
    let corpus = Corpus::load("shakespeare", DataFormat::Text)?;
    let mut seen = [false; 256];
    for &b in corpus.train.iter() {
        seen[b as usize] = true;
    }
    let mask: Vec<f32> = seen.iter().map(|&s| if s { 0.0 } else { f32::NEG_INFINITY }).collect();
    let mask = Tensor::from_vec(mask, 256, &dev)?;
    let mut rng = Rng::new(7);
    let (mut full, mut restricted, mut unseen) = (0.0, 0.0, 0.0);
    let n = 50;
    for _ in 0..n {
        let (x, y) = random_batch(&corpus.val, 12, 64, &mut rng, &dev)?;
        let logits = model.forward(&x, None)?;
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let lr = candle_nn::ops::log_softmax(&logits.broadcast_add(&mask)?, D::Minus1)?;
        let pick = |t: &Tensor| -> anyhow::Result<f64> {
            Ok(t.gather(&y.unsqueeze(D::Minus1)?, D::Minus1)?.mean_all()?.to_scalar::<f32>()? as f64)
        };
        full -= pick(&lp)?;
        restricted -= pick(&lr)?;
        let p_unseen = lp.exp()?.broadcast_mul(&mask.exp()?.affine(-1.0, 1.0)?)?.sum(D::Minus1)?.mean_all()?;
        unseen += p_unseen.to_scalar::<f32>()? as f64;
    }
    let seen_count = seen.iter().filter(|&&s| s).count();
    println!(
        "{{\"bytes_seen\": {seen_count}, \"val_loss\": {:.4}, \"val_loss_restricted\": {:.4}, \"unseen_mass\": {:.5}}}",
        full / n as f64,
        restricted / n as f64,
        unseen / n as f64
    );
    Ok(())
}
