//! What each architecture costs: the review's stated complexity (verbatim), the true one,
//! and analytic counts the benchmarks and the report compare against measurement.

/// The shape a cost is evaluated at.
#[derive(Clone, Copy, Debug)]
pub struct CostShape {
    pub batch: usize,
    pub seq: usize,
    pub width: usize,
    pub heads: usize,
}

/// The review's complexity table, word for word (`data/review-complexity.md`: the rows the
/// project's architecture brief quotes). Architectures name their row; the report quotes the
/// cells from here, so a quotation cannot drift from its source.
const REVIEW_TABLE: &str = include_str!("../../../data/review-complexity.md");

/// The review table's rows as (model, time, space), header and rule left out.
fn review_table() -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
    REVIEW_TABLE.lines().filter_map(|line| {
        let cells: Vec<&str> = line.trim().strip_prefix('|')?.strip_suffix('|')?.split('|').map(str::trim).collect();
        match cells[..] {
            [name, time, space] if name != "model" && !name.starts_with("---") => Some((name, time, space)),
            _ => None,
        }
    })
}

/// The review's (time, space) cells of row `model`, or `None` where the table has no such row.
pub fn review_line(model: &str) -> Option<(&'static str, &'static str)> {
    review_table().find(|(name, ..)| *name == model).map(|(_, time, space)| (time, space))
}

/// The names of the review table's rows, in order.
pub fn review_rows() -> impl Iterator<Item = &'static str> {
    review_table().map(|(name, ..)| name)
}

/// What is wrong or loose in the review's account of an architecture.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Judgement {
    Agrees,
    /// Right as far as it goes, but it leaves out or misdescribes something; why.
    Imprecise(&'static str),
    /// A stated figure is false; why.
    Wrong(&'static str),
}

/// What the review says of an architecture's cost: the row of its table the architecture
/// falls under (`None`: the review gives it no line) and our judgement of that row.
#[derive(Clone, Copy)]
pub struct Review {
    pub row: Option<&'static str>,
    pub judgement: Judgement,
}

impl Review {
    /// The review gives this architecture no complexity line.
    pub const NO_LINE: Review = Review { row: None, judgement: Judgement::Agrees };

    /// The review's time and space cells, verbatim, or "(none)" for both where it gives no line.
    pub fn stated(&self) -> (&'static str, &'static str) {
        self.row.and_then(review_line).unwrap_or(("(none)", "(none)"))
    }
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
    /// What the report says of the review's line: wrong or imprecise (with why), agrees, or
    /// that there is none.
    pub fn verdict(&self) -> String {
        match (self.review.row, self.review.judgement) {
            (None, _) => "no line in the review".to_string(),
            (Some(_), Judgement::Agrees) => "agrees".to_string(),
            (Some(_), Judgement::Imprecise(why)) => format!("imprecise: {why}"),
            (Some(_), Judgement::Wrong(why)) => format!("wrong: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cells come back exactly as the review's table writes them, commas and all.
    #[test]
    fn the_review_table_is_read_cell_for_cell() {
        assert_eq!(review_line("Hyena"), Some(("O(NdT (logT + d)), N the number of projections", "O(Td)")));
        assert_eq!(review_line("AFT"), Some(("AFT-simple O(Td), AFT-full O(T^2d)", "O(Td)")));
        assert_eq!(review_line("Linformer"), Some(("O(n)", "(none)")));
        assert_eq!(review_line("Mamba"), None);
        assert_eq!(review_line("model"), None, "the header is not a row");
        let rows: Vec<_> = review_rows().collect();
        assert_eq!(rows.len(), 10, "{rows:?}");
        assert_eq!(rows[0], "Transformer");
        assert_eq!(Review::NO_LINE.stated(), ("(none)", "(none)"));
    }
}
