use std::time::Instant;
fn main() {
    let shapes = [(768, 128, 384), (768, 128, 128), (768, 128, 512), (768, 512, 128), (128, 768, 384), (768, 384, 128), (768, 128, 256)];
    for &(m, k, n) in &shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let run = |c: &mut Vec<f32>| unsafe {
            gemm::gemm(m, n, k, c.as_mut_ptr(), 1, n as isize, false, a.as_ptr(), 1, k as isize, b.as_ptr(), 1, n as isize, 0.0, 1.0, false, false, false, gemm::Parallelism::None);
        };
        for _ in 0..50 { run(&mut c); }
        let reps = 2000;
        let t = Instant::now();
        for _ in 0..reps { run(&mut c); }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!("{m}x{k}x{n}: gemm {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / s / 1e9);
    }
}
