//! What an endpoint is and what it keeps between requests: its variants and the plugins
//! bound to it (rebuilt from the configuration and swapped in whole), the router's state,
//! the last decisions, every variant's statistics, the answers remembered for feedback,
//! accuracy and reward by segment, and the A/B comparison of rewards.
//!
//! Owns: that state and the rules for carrying it across rebuilds. Must not touch: the
//! steps of one request (pipeline), the wire (http), running models or plugins (it binds
//! plugins, the plugin runtime runs them).

mod binding;
mod decisions;
mod experiment;
mod feedback;
mod performance;
mod stats;
mod strategy;

pub use binding::{Bound, Build, Endpoint, EndpointSet, Variant};
pub use decisions::DecisionRecord;
pub use experiment::compare;
pub use feedback::{Feedback, FeedbackBook, Memo};
pub use performance::{LABELLED_ROWS, predictions};
pub use stats::{Agreement, Elsewhere, StatsBook, Tally};
pub use strategy::{ActError, StrategyState};
