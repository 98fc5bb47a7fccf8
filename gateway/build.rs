//! Link settings of the gateway's binary.

fn main() {
    // Relative relocations packed (DT_RELR; glibc 2.36 and binutils 2.38 or later, as in
    // Debian 12 and the distroless image): at start the loader reads a few KiB instead of the
    // 1.1 MiB of `.rela.dyn` entries a position-independent binary of this size carries, so
    // those pages never become part of the gateway's resident memory.
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
