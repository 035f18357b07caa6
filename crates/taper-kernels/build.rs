//! With the `cuda` feature, compiles the kernels under cuda/ to PTX with nvcc (through
//! cudaforge, as candle-kernels does) for `CUDA_COMPUTE_CAP`; without it, nothing.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    pub fn build() {
        println!("cargo::rerun-if-changed=cuda");
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let built = cudaforge::KernelBuilder::new()
            .source_dir("cuda")
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .and_then(|ptx| ptx.write(out.join("ptx.rs")));
        if let Err(e) = built {
            eprintln!(
                "taper-kernels: compiling the CUDA kernels failed: {e}\n  the `cuda` feature needs nvcc (CUDA_ROOT or \
                 CUDA_PATH naming the toolkit, or nvcc on PATH) and CUDA_COMPUTE_CAP for machines without a GPU (e.g. 90)"
            );
            std::process::exit(1);
        }
    }
}
