//! Embeds the libtorch library folder as a run-time search path, so the
//! participant binary starts without LD_LIBRARY_PATH. DT_RPATH (not the newer
//! DT_RUNPATH) is used because it also applies to libtorch's own
//! dependencies (libc10, libgomp, the CUDA runtime stubs).

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags,-rpath,{libtorch}/lib");
    }
}
