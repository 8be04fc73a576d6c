//! The processor's and flags' bindings reuse the router's shared interfaces, which
//! wit-bindgen names with the package's version. That version is written once, in the
//! WIT's `package` line: this reads it from there and writes `OUT_DIR/reuse.rs`, a macro
//! that generates bindings with the shared interfaces reused.

use std::error::Error;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo::rerun-if-changed=wit/plugin.wit");
    let wit = std::fs::read_to_string("wit/plugin.wit")?;
    let (package, version) = wit
        .lines()
        .find_map(|line| {
            line.strip_prefix("package ")?
                .strip_suffix(';')?
                .split_once('@')
        })
        .ok_or("wit/plugin.wit has no `package <name>@<version>;` line")?;
    let reuse = format!(
        r#"/// `wit_bindgen::generate!` with `types` and `host` taken from the router's bindings.
macro_rules! generate_reusing_shared {{
    ($($option:tt)*) => {{
        wit_bindgen::generate!({{
            $($option)*
            with: {{
                "{package}/types@{version}": super::router::modelyard::plugin::types,
                "{package}/host@{version}": super::router::modelyard::plugin::host,
            }},
        }});
    }};
}}
"#
    );
    std::fs::write(
        PathBuf::from(std::env::var("OUT_DIR")?).join("reuse.rs"),
        reuse,
    )?;
    Ok(())
}
