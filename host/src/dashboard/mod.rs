//! The operator dashboard's own parts: the page and its scripts, built into the binary
//! (uPlot vendored, see `assets/vendor/uplot/VENDORED.md`), and the in-memory history of
//! every endpoint that its charts draw. Everything else it shows comes from the `/admin/`
//! API, through the same tokens, in the browser.
//!
//! Owns: the assets and the history. Must not touch: HTTP (the `http` module serves both),
//! or anything an operator changes (the page acts through `/admin/` like any client).

pub mod history;

pub use history::History;

/// A file of the page: its name under `/dashboard/`, media type and bytes.
pub struct Asset {
    pub name: &'static str,
    pub media_type: &'static str,
    pub bytes: &'static [u8],
}

const HTML: &str = "text/html; charset=utf-8";
const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every file the page loads; the first is the page itself.
pub const ASSETS: [Asset; 5] = [
    file("", HTML, include_bytes!("assets/index.html")),
    file("app.js", JAVASCRIPT, include_bytes!("assets/app.js")),
    file("app.css", CSS, include_bytes!("assets/app.css")),
    file(
        "uPlot.iife.min.js",
        JAVASCRIPT,
        include_bytes!("assets/vendor/uplot/uPlot.iife.min.js"),
    ),
    file(
        "uPlot.min.css",
        CSS,
        include_bytes!("assets/vendor/uplot/uPlot.min.css"),
    ),
];

const fn file(name: &'static str, media_type: &'static str, bytes: &'static [u8]) -> Asset {
    Asset {
        name,
        media_type,
        bytes,
    }
}

/// The page's asset called `name`.
pub fn asset(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    /// The vendored uPlot is the release VENDORED.md names, byte for byte.
    #[test]
    fn the_vendored_charting_library_is_the_pinned_release() {
        let noted = include_str!("assets/vendor/uplot/VENDORED.md");
        for name in ["uPlot.iife.min.js", "uPlot.min.css"] {
            let digest = Sha256::digest(asset(name).unwrap().bytes);
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            assert!(
                noted.contains(&format!("{hex}  {name}")),
                "{name} is not the file VENDORED.md pins ({hex})"
            );
        }
    }
}
