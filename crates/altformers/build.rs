//! With the `cuda` feature, compiles every `src/kernels/*.cu` to PTX for sm_90 with nvcc
//! (scripts/cuda-env.sh provides one) and writes `$OUT_DIR/kernels_ptx.rs`: one
//! `pub const NAME: &str` (the file stem, upper case) per kernel file. Without the feature
//! nothing is compiled, so a CPU build needs no CUDA toolkit.
use std::{env, fs, path::PathBuf, process::Command};

fn main() {
    println!("cargo:rerun-if-changed=src/kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let mut consts = String::new();
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
        let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
        let mut files: Vec<PathBuf> = fs::read_dir("src/kernels")
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "cu"))
            .collect();
        files.sort();
        for cu in files {
            println!("cargo:rerun-if-changed={}", cu.display());
            let stem = cu.file_stem().unwrap().to_str().unwrap().to_string();
            // `*_sm90a.cu`: Hopper's architecture-specific instructions (wgmma), whose PTX loads
            // only on compute capability 9.0; for another target the constant is empty and
            // the kernels' loader reports it. The rest stays portable sm_XX PTX.
            let arch = match (stem.ends_with("_sm90a"), cap.as_str()) {
                (true, "90") => "sm_90a".to_string(),
                (true, _) => {
                    consts.push_str(&format!("pub const {}: &str = \"\";\n", stem.to_uppercase()));
                    continue;
                }
                (false, _) => format!("sm_{cap}"),
            };
            let ptx = out.join(format!("{stem}.ptx"));
            let status = Command::new(&nvcc)
                .args([
                    "--ptx",
                    "-O3",
                    "-std=c++17",
                    "--use_fast_math",
                    &format!("-arch={arch}"),
                    "-Isrc/kernels",
                    "-o",
                ])
                .arg(&ptx)
                .arg(&cu)
                .status()
                .unwrap_or_else(|e| panic!("cannot run nvcc ({nvcc}): {e}; source scripts/cuda-env.sh first"));
            assert!(status.success(), "nvcc failed on {}", cu.display());
            consts.push_str(&format!(
                "pub const {}: &str = include_str!(concat!(env!(\"OUT_DIR\"), \"/{stem}.ptx\"));\n",
                stem.to_uppercase()
            ));
        }
    }
    fs::write(out.join("kernels_ptx.rs"), consts).unwrap();
}
