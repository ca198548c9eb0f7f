//! With the `cuda` feature, compiles every `.cu` file under `src/` (`src/kernels/` and each
//! mechanism's folder under `src/ops/`) to PTX for sm_90 with nvcc (scripts/cuda-env.sh
//! provides one) and writes `$OUT_DIR/kernels_ptx.rs`: one `pub const NAME: &str` (the file
//! stem, upper case, so stems must be unique across folders) per kernel file. Every folder
//! holding a `.cuh` header is on the include path. Without the feature nothing is compiled,
//! so a CPU build needs no CUDA toolkit.
use std::{collections::BTreeMap, env, fs, path::Path, path::PathBuf, process::Command};

/// Every file under `dir` (recursively), sorted.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn main() {
    let mut all = Vec::new();
    walk(Path::new("src"), &mut all);
    let has_ext = |p: &Path, ext: &str| p.extension().is_some_and(|e| e == ext);
    let kernels: Vec<PathBuf> = all.iter().filter(|p| has_ext(p, "cu")).cloned().collect();
    let headers: Vec<PathBuf> = all.iter().filter(|p| has_ext(p, "cuh")).cloned().collect();
    // the files themselves, their folders (a kernel file added or removed), and the folders
    // that hold kernels (a new mechanism folder under ops/)
    let mut watched: Vec<PathBuf> =
        kernels.iter().chain(&headers).flat_map(|p| [p.clone(), p.parent().unwrap().to_path_buf()]).collect();
    watched.extend([PathBuf::from("src/ops"), PathBuf::from("src/kernels")]);
    watched.sort();
    watched.dedup();
    for p in &watched {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    // one constant per stem: two kernel files of one name would collide
    let mut stems: BTreeMap<String, &PathBuf> = BTreeMap::new();
    for cu in &kernels {
        let stem = cu.file_stem().unwrap().to_str().unwrap().to_string();
        if let Some(other) = stems.insert(stem.clone(), cu) {
            panic!(
                "two kernel files named {stem}.cu ({} and {}): PTX constants are named by the stem",
                other.display(),
                cu.display()
            );
        }
    }
    let mut includes: Vec<String> = headers.iter().map(|h| format!("-I{}", h.parent().unwrap().display())).collect();
    includes.sort();
    includes.dedup();
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let mut consts = String::new();
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
        let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
        for (stem, cu) in &stems {
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
                .args(["--ptx", "-O3", "-std=c++17", "--use_fast_math", &format!("-arch={arch}")])
                .args(&includes)
                .arg("-o")
                .arg(&ptx)
                .arg(cu)
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
