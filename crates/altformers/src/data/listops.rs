//! ListOps (Nangia and Bowman 2018) as the Long Range Arena defines it (Tay et al. 2020,
//! arXiv 2011.04006, section 3.1, and its generator `listops.py`): nested lists of the
//! operators MAX, MIN, MED (median, truncated to an integer) and SM (sum modulo 10) over the
//! digits 0-9; the label is the value of the whole expression, one of 10 classes.
//!
//! The generator follows LRA's: a node below the maximum depth is an operator with
//! probability 0.25 (else a digit), an operator takes 2 to `max_args` arguments, a node at
//! the maximum depth is a digit; trees are drawn until one's length lies strictly between
//! `min_len` and `max_len` (LRA: depth 10, 10 arguments, 500 and 2000). Each token is one
//! byte, so a sequence's length is LRA's length (operators and `]` count one each; LRA's
//! parentheses, which its tokenizer drops, are not written): `M` MAX, `m` MIN, `d` MED,
//! `s` SM, `]` the end of a list, `0`-`9` the digits. `[MAX 2 9 [MIN 4 7 ] 0 ]` is `M29m47]0]`.
//!
//! Example `i` of a split is a pure function of `(seed, split, i)`: any number of examples,
//! the same ones on every machine, and the three splits disjoint streams.

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Max,
    Min,
    Med,
    SumMod,
}

impl Op {
    const ALL: [Op; 4] = [Op::Min, Op::Max, Op::Med, Op::SumMod];

    pub fn byte(self) -> u8 {
        match self {
            Op::Max => b'M',
            Op::Min => b'm',
            Op::Med => b'd',
            Op::SumMod => b's',
        }
    }

    fn of_byte(b: u8) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.byte() == b)
    }

    /// LRA's semantics: `int(np.median(...))` for MED, `sum % 10` for SM.
    pub fn apply(self, args: &[u8]) -> u8 {
        match self {
            Op::Max => *args.iter().max().unwrap_or(&0),
            Op::Min => *args.iter().min().unwrap_or(&0),
            Op::Med => {
                let mut v = args.to_vec();
                v.sort_unstable();
                let n = v.len();
                if n == 0 {
                    0
                } else if n % 2 == 1 {
                    v[n / 2]
                } else {
                    ((v[n / 2 - 1] as u16 + v[n / 2] as u16) / 2) as u8
                }
            }
            Op::SumMod => (args.iter().map(|&a| a as u32).sum::<u32>() % 10) as u8,
        }
    }
}

/// An expression: a digit, or an operator over its arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Digit(u8),
    Apply(Op, Vec<Node>),
}

impl Node {
    pub fn value(&self) -> u8 {
        match self {
            Node::Digit(d) => *d,
            Node::Apply(op, args) => op.apply(&args.iter().map(Node::value).collect::<Vec<_>>()),
        }
    }

    /// Tokens (one byte each), LRA's length.
    pub fn tokens(&self) -> usize {
        match self {
            Node::Digit(_) => 1,
            Node::Apply(_, args) => 2 + args.iter().map(Node::tokens).sum::<usize>(),
        }
    }

    pub fn depth(&self) -> usize {
        match self {
            Node::Digit(_) => 1,
            Node::Apply(_, args) => 1 + args.iter().map(Node::depth).max().unwrap_or(0),
        }
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            Node::Digit(d) => out.push(b'0' + d),
            Node::Apply(op, args) => {
                out.push(op.byte());
                args.iter().for_each(|a| a.write(out));
                out.push(b']');
            }
        }
    }
}

/// The value of a written expression, by a stack machine over its bytes (independent of
/// [`Node::value`], which the tests hold it to); malformed input is an error naming the place.
pub fn evaluate(bytes: &[u8]) -> Result<u8> {
    let mut stack: Vec<(Op, Vec<u8>)> = Vec::new();
    let mut result = None;
    for (i, &b) in bytes.iter().enumerate() {
        ensure!(result.is_none(), "ListOps: bytes after the end of the expression at {i}");
        let value = match b {
            b'0'..=b'9' => Some(b - b'0'),
            b']' => match stack.pop() {
                Some((op, args)) if args.len() >= 2 => Some(op.apply(&args)),
                Some(_) => bail!("ListOps: a list of fewer than 2 arguments ends at {i}"),
                None => bail!("ListOps: `]` without an operator at {i}"),
            },
            _ => match Op::of_byte(b) {
                Some(op) => {
                    stack.push((op, Vec::new()));
                    None
                }
                None => bail!("ListOps: byte {b:#04x} at {i} is not a ListOps token"),
            },
        };
        if let Some(v) = value {
            match stack.last_mut() {
                Some((_, args)) => args.push(v),
                None => result = Some(v),
            }
        }
    }
    ensure!(stack.is_empty(), "ListOps: {} list(s) left open", stack.len());
    result.ok_or_else(|| anyhow::anyhow!("ListOps: an empty expression"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Validation,
    Test,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListOpsConfig {
    pub max_depth: usize,
    pub max_args: usize,
    /// Lengths kept lie strictly between these (LRA: 500 and 2000).
    pub min_len: usize,
    pub max_len: usize,
    pub seed: u64,
}

impl Default for ListOpsConfig {
    fn default() -> Self {
        Self { max_depth: 10, max_args: 10, min_len: 500, max_len: 2000, seed: 0 }
    }
}

/// One example: the expression's bytes and its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub tokens: Vec<u8>,
    pub label: u8,
}

/// Stream purpose of ListOps examples (beside [`crate::rng::stream`]'s), one per split.
const STREAM: u64 = 100;

/// The deepest tree the generator may draw: it recurses once per level, and a worker
/// thread's 2 MB stack holds this many levels (LRA: 10).
const MAX_DEPTH: usize = 1000;

/// The largest mean size of a drawn tree, in nodes: each is built whole before its length is
/// measured, so larger settings (`max_args` 10^9: one node's argument list alone) would
/// exhaust memory or time instead of drawing examples (LRA's settings: 113).
const MAX_EXPECTED_NODES: f64 = 1e6;

impl ListOpsConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.max_args >= 2, "ListOps: max_args must be at least 2, got {}", self.max_args);
        ensure!(self.max_depth >= 2, "ListOps: max_depth must be at least 2, got {}", self.max_depth);
        ensure!(
            self.max_depth <= MAX_DEPTH,
            "ListOps: max_depth must be at most {MAX_DEPTH} (the generator recurses once per level), got {}",
            self.max_depth
        );
        let nodes = self.expected_nodes();
        ensure!(
            nodes <= MAX_EXPECTED_NODES,
            "ListOps: max_depth {} and max_args {} draw trees of {nodes:.3e} nodes on average, more than {MAX_EXPECTED_NODES:e}: lower them",
            self.max_depth,
            self.max_args
        );
        ensure!(
            self.min_len + 1 < self.max_len,
            "ListOps: no length lies strictly between min_len {} and max_len {}",
            self.min_len,
            self.max_len
        );
        Ok(())
    }

    /// The mean node count of a tree [`Self::tree`] draws: below the maximum depth a node is
    /// an operator with probability 0.25, of 2 to `max_args` arguments (on average
    /// `(2 + max_args) / 2`); a node at the maximum depth is a digit.
    fn expected_nodes(&self) -> f64 {
        let children = 0.25 * (2 + self.max_args) as f64 / 2.0;
        (1..self.max_depth).fold(1.0, |below, _| 1.0 + children * below)
    }

    /// LRA's `generate_tree`: below the maximum depth an operator with probability 0.25.
    fn tree(&self, rng: &mut Rng, depth: usize) -> Node {
        if depth < self.max_depth && rng.uniform() <= 0.25 {
            let op = Op::ALL[rng.below(4)];
            let n = 2 + rng.below(self.max_args - 1);
            Node::Apply(op, (0..n).map(|_| self.tree(rng, depth + 1)).collect())
        } else {
            Node::Digit(rng.below(10) as u8)
        }
    }

    /// Example `index` of `split`: trees drawn from its stream until one's length fits.
    pub fn example(&self, split: Split, index: u64) -> Result<Example> {
        self.validate()?;
        let mut rng = Rng::derive(self.seed, STREAM + split as u64, index);
        // At LRA's settings 1,678 trees in 20,000 fit (median length 958); the bound turns
        // impossible settings into an error instead of a hang.
        for _ in 0..100_000 {
            let tree = self.tree(&mut rng, 1);
            let len = tree.tokens();
            if len > self.min_len && len < self.max_len {
                let mut tokens = Vec::with_capacity(len);
                tree.write(&mut tokens);
                return Ok(Example { tokens, label: tree.value() });
            }
        }
        bail!("ListOps: no tree of length in ({}, {}) after 100000 draws", self.min_len, self.max_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operators_are_lras() -> Result<()> {
        assert_eq!(evaluate(b"M29m47]0]")?, 9); // [MAX 2 9 [MIN 4 7 ] 0 ]
        assert_eq!(evaluate(b"d12]")?, 1); // median 1.5, truncated
        assert_eq!(evaluate(b"d312]")?, 2);
        assert_eq!(evaluate(b"d1739]")?, 5); // median (3 + 7) / 2
        assert_eq!(evaluate(b"s98]")?, 7);
        assert_eq!(evaluate(b"m5s99]d123]]")?, 2); // [MIN 5 [SM 9 9 ] [MED 1 2 3 ] ] = min(5, 8, 2)
        assert_eq!(evaluate(b"7")?, 7);
        for bad in [&b"M1]"[..], b"M12", b"]", b"M1x]", b"", b"M12]3"] {
            assert!(evaluate(bad).is_err(), "{:?} accepted", std::str::from_utf8(bad));
        }
        Ok(())
    }

    #[test]
    fn examples_are_reproducible_within_bounds_and_correctly_labelled() -> Result<()> {
        let cfg = ListOpsConfig { min_len: 100, max_len: 400, ..Default::default() };
        let mut labels = [0usize; 10];
        for i in 0..200 {
            let e = cfg.example(Split::Train, i)?;
            assert_eq!(e, cfg.example(Split::Train, i)?, "example {i} is not reproducible");
            assert!(e.tokens.len() > 100 && e.tokens.len() < 400, "length {}", e.tokens.len());
            assert_eq!(evaluate(&e.tokens)?, e.label, "example {i}: the label is not the expression's value");
            labels[e.label as usize] += 1;
        }
        assert!(labels.iter().all(|&n| n > 0), "a class never occurs in 200 examples: {labels:?}");
        let other = cfg.example(Split::Test, 0)?;
        assert_ne!(other, cfg.example(Split::Train, 0)?, "the splits share a stream");
        assert_ne!(other, ListOpsConfig { seed: 1, ..cfg }.example(Split::Test, 0)?, "the seed changes nothing");
        Ok(())
    }

    #[test]
    fn trees_respect_the_depth_and_argument_limits() -> Result<()> {
        let cfg = ListOpsConfig { max_depth: 4, max_args: 3, min_len: 5, max_len: 60, seed: 3 };
        for i in 0..100 {
            let mut rng = Rng::derive(cfg.seed, STREAM, i);
            let tree = cfg.tree(&mut rng, 1);
            assert!(tree.depth() <= 4, "depth {}", tree.depth());
            fn widest(n: &Node) -> usize {
                match n {
                    Node::Digit(_) => 0,
                    Node::Apply(_, a) => a.len().max(a.iter().map(widest).max().unwrap_or(0)),
                }
            }
            assert!(widest(&tree) <= 3);
        }
        assert!(cfg.example(Split::Validation, 0).is_ok());
        assert!(ListOpsConfig { min_len: 10, max_len: 11, ..cfg }.validate().is_err());
        Ok(())
    }

    /// Settings whose trees would not fit in memory or on the stack are refused before any
    /// tree is drawn (max_args 10^9 aborted in the allocator, max_depth 10^12 overflowed the
    /// stack); LRA's settings average 113 nodes.
    #[test]
    fn settings_that_grow_trees_without_bound_are_refused() {
        let lra = ListOpsConfig::default();
        assert!((lra.expected_nodes() - 113.33).abs() < 0.01, "{}", lra.expected_nodes());
        for (cfg, needle) in [
            (ListOpsConfig { max_args: 1_000_000_000, ..lra }, "max_depth 10 and max_args 1000000000 draw trees of"),
            (ListOpsConfig { max_depth: 1_000_000_000_000, max_args: 2, ..lra }, "max_depth must be at most 1000"),
            (ListOpsConfig { max_depth: 100, ..lra }, "max_depth 100 and max_args 10"),
        ] {
            let err = cfg.example(Split::Train, 0).unwrap_err().to_string();
            assert!(err.contains(needle), "{cfg:?}: expected `{needle}` in: {err}");
        }
        // a deep but subcritical generator (2 or 3 arguments) is fine
        assert!(ListOpsConfig { max_depth: 1000, max_args: 3, min_len: 2, max_len: 60, seed: 0 }.validate().is_ok());
    }

    /// At LRA's own settings examples exist and are long: the default configuration works.
    #[test]
    fn lra_settings_give_sequences_of_500_to_2000() -> Result<()> {
        let cfg = ListOpsConfig::default();
        for i in 0..5 {
            let e = cfg.example(Split::Train, i)?;
            assert!(e.tokens.len() > 500 && e.tokens.len() < 2000);
        }
        Ok(())
    }
}
