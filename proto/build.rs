//! Compiles `proto/` with protox (a pure-Rust .proto compiler: no protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "fieldgate/v1/reading.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
