//! What each architecture costs: the review's stated complexity (verbatim), the true one,
//! and analytic counts the benchmarks and the report compare against measurement.

/// For a stated complexity that the project's architecture brief does not quote from the review.
pub const NOT_QUOTED: &str = "(not quoted)";

/// The shape a cost is evaluated at.
#[derive(Clone, Copy, Debug)]
pub struct CostShape {
    pub batch: usize,
    pub seq: usize,
    pub width: usize,
    pub heads: usize,
}

/// What the review says of an architecture's cost, verbatim, and where it is wrong.
#[derive(Clone, Copy)]
pub struct Review {
    /// The review's time complexity, verbatim ([`NOT_QUOTED`] where the brief quotes none).
    pub stated_time: &'static str,
    pub stated_space: &'static str,
    /// Where the review is wrong, a one-line reason; empty where it agrees.
    pub error: &'static str,
}

impl Review {
    /// No figure of the review is quoted for this architecture.
    pub const NOT_QUOTED: Review = Review { stated_time: NOT_QUOTED, stated_space: NOT_QUOTED, error: "" };
}

#[derive(Clone, Copy)]
pub struct Complexity {
    pub review: Review,
    /// The true complexity of the mixer as implemented here (T length, d width, h heads).
    pub true_time: &'static str,
    pub true_space: &'static str,
    /// Forward FLOPs of one mixer layer (multiply-add = 2 FLOPs).
    pub flops: fn(&CostShape) -> f64,
    /// Peak activation memory of one mixer layer's forward, in elements.
    pub memory: fn(&CostShape) -> f64,
    /// Elements of decode state per layer after `seq` tokens.
    pub state: fn(&CostShape) -> f64,
}

impl Complexity {
    /// What the report says of the review's figure: wrong (with why), agrees, or not quoted.
    pub fn verdict(&self) -> String {
        let r = &self.review;
        if !r.error.is_empty() {
            format!("wrong: {}", r.error)
        } else if r.stated_time == NOT_QUOTED {
            "not quoted".to_string()
        } else {
            "agrees".to_string()
        }
    }
}
