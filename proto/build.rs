//! Compiles `proto/` with protox (a pure-Rust .proto compiler: no protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["fieldgate/v1/reading.proto", "fieldgate/v1/compact.proto", "sparkplug_b/sparkplug_b.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let descriptors = protox::compile(protos, ["."])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
