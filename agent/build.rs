//! Records the target triple the agent is built for: by default a device
//! accepts only releases built for the same target as its agent.
fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=FERRY_AGENT_TARGET={target}");
}
