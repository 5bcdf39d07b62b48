//! Reliability block diagrams: series, parallel and k-of-n composition of independent
//! blocks, and a small expression language to write them on a command line.
//!
//! ```text
//! block    := number                    an availability or reliability, 0..1
//!           | duration "/" duration     MTTF/MTTR, e.g. 720h/1h or 30d/1h
//!           | "series"   "(" blocks ")" every block up
//!           | "parallel" "(" blocks ")" at least one block up
//!           | K "of" N   "(" blocks ")" at least K of the N blocks up
//! blocks   := block ("," block)*
//! ```
//!
//! For example a client that needs its load balancer and a three-member keel cluster:
//! `series(0.9995, 2of3(30d/1h, 30d/1h, 30d/1h))`.

use serde::Serialize;

use crate::component::steady_state_availability;
use crate::duration::parse_hours;
use crate::quorum::{k_of_n, UpDown};
use crate::AvailabilityError;

/// The longest expression accepted, and the deepest nesting: limits on what one command
/// line may ask of the parser.
pub const EXPRESSION_BYTES_MAX: usize = 64 * 1024;
/// See [`EXPRESSION_BYTES_MAX`].
pub const NESTING_DEPTH_MAX: usize = 64;

/// A block of a reliability block diagram.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Block {
    /// One component with its probability of being up.
    Component {
        /// P(up) and P(down).
        probability: UpDown,
    },
    /// Up while at least `required` of `blocks` are up (series: all; parallel: one).
    KOfN {
        /// k.
        required: usize,
        /// The n blocks.
        blocks: Vec<Block>,
    },
}

impl Block {
    /// Every block must be up.
    pub fn series(blocks: Vec<Block>) -> Block {
        Block::KOfN {
            required: blocks.len(),
            blocks,
        }
    }

    /// At least one block must be up.
    pub fn parallel(blocks: Vec<Block>) -> Block {
        Block::KOfN {
            required: 1,
            blocks,
        }
    }

    /// The probability that the block is up, assuming its parts fail independently.
    pub fn evaluate(&self) -> Result<UpDown, AvailabilityError> {
        match self {
            Block::Component { probability } => Ok(*probability),
            Block::KOfN { required, blocks } => {
                let parts = blocks
                    .iter()
                    .map(Block::evaluate)
                    .collect::<Result<Vec<_>, _>>()?;
                k_of_n(*required, &parts)
            }
        }
    }

    /// Reads an expression (see the module documentation).
    pub fn parse(text: &str) -> Result<Block, AvailabilityError> {
        if text.len() > EXPRESSION_BYTES_MAX {
            return Err(AvailabilityError::LimitExceeded {
                what: "expression bytes".to_owned(),
                limit: EXPRESSION_BYTES_MAX as u64,
            });
        }
        let mut parser = Parser {
            text,
            position: 0,
            depth: 0,
        };
        let block = parser.block()?;
        parser.skip_whitespace();
        if parser.position != text.len() {
            return Err(parser.error("unexpected text after the expression"));
        }
        Ok(block)
    }
}

struct Parser<'a> {
    text: &'a str,
    position: usize,
    depth: usize,
}

impl Parser<'_> {
    fn error(&self, reason: &str) -> AvailabilityError {
        AvailabilityError::Parse {
            text: self.text.to_owned(),
            reason: format!("{reason} at byte {}", self.position),
        }
    }

    fn skip_whitespace(&mut self) {
        let rest = &self.text[self.position..];
        self.position += rest.len() - rest.trim_start().len();
    }

    fn rest(&self) -> &str {
        &self.text[self.position..]
    }

    /// Takes the next run of characters that may form a word, a number or a duration.
    fn token(&mut self) -> &str {
        self.skip_whitespace();
        let start = self.position;
        let length = self
            .rest()
            .find(|character: char| !(character.is_ascii_alphanumeric() || character == '.'))
            .unwrap_or(self.rest().len());
        self.position += length;
        &self.text[start..start + length]
    }

    fn expect(&mut self, symbol: char) -> Result<(), AvailabilityError> {
        self.skip_whitespace();
        if self.rest().starts_with(symbol) {
            self.position += 1;
            Ok(())
        } else {
            Err(self.error(&format!("expected {symbol:?}")))
        }
    }

    fn block(&mut self) -> Result<Block, AvailabilityError> {
        self.depth += 1;
        if self.depth > NESTING_DEPTH_MAX {
            return Err(AvailabilityError::LimitExceeded {
                what: "expression nesting depth".to_owned(),
                limit: NESTING_DEPTH_MAX as u64,
            });
        }
        let token = self.token().to_owned();
        if token.is_empty() {
            return Err(self.error("expected a number, MTTF/MTTR, series, parallel or KofN"));
        }
        let block = if token == "series" || token == "parallel" || is_k_of_n(&token) {
            let blocks = self.arguments()?;
            match token.as_str() {
                "series" => Block::series(blocks),
                "parallel" => Block::parallel(blocks),
                _ => {
                    let (required, count) = token.split_once("of").expect("checked by is_k_of_n");
                    let required: usize = required.parse().map_err(|_| self.error("bad K"))?;
                    let count: usize = count.parse().map_err(|_| self.error("bad N"))?;
                    if count != blocks.len() {
                        return Err(self.error(&format!(
                            "{token} needs {count} blocks, not {}",
                            blocks.len()
                        )));
                    }
                    if required == 0 || required > count {
                        return Err(self.error(&format!("{token}: K must be between 1 and N")));
                    }
                    Block::KOfN { required, blocks }
                }
            }
        } else {
            self.skip_whitespace();
            if self.rest().starts_with('/') {
                self.position += 1;
                let repair = self.token().to_owned();
                let mean_time_to_failure_hours = parse_hours(&token)?;
                let mean_time_to_repair_hours = parse_hours(&repair)?;
                let availability = steady_state_availability(
                    mean_time_to_failure_hours,
                    mean_time_to_repair_hours,
                )?;
                Block::Component {
                    probability: UpDown {
                        up: availability,
                        down: mean_time_to_repair_hours
                            / (mean_time_to_failure_hours + mean_time_to_repair_hours),
                    },
                }
            } else {
                let probability: f64 = token
                    .parse()
                    .map_err(|_| self.error(&format!("{token:?} is not a block")))?;
                Block::Component {
                    probability: UpDown::from_up(probability)?,
                }
            }
        };
        self.depth -= 1;
        Ok(block)
    }

    fn arguments(&mut self) -> Result<Vec<Block>, AvailabilityError> {
        self.expect('(')?;
        let mut blocks = vec![self.block()?];
        loop {
            self.skip_whitespace();
            if self.rest().starts_with(',') {
                self.position += 1;
                blocks.push(self.block()?);
            } else {
                self.expect(')')?;
                return Ok(blocks);
            }
        }
    }
}

/// Whether a word is `KofN` with digits on both sides.
fn is_k_of_n(token: &str) -> bool {
    token.split_once("of").is_some_and(|(required, count)| {
        !required.is_empty()
            && !count.is_empty()
            && required.bytes().all(|byte| byte.is_ascii_digit())
            && count.bytes().all(|byte| byte.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(actual: f64, expected: f64, tolerance: f64) {
        assert!(
            (actual - expected).abs() <= tolerance,
            "{actual} is not within {tolerance} of {expected}"
        );
    }

    #[test]
    fn series_multiplies_and_parallel_multiplies_the_downs() {
        let series = Block::parse("series(0.99, 0.9)")
            .unwrap()
            .evaluate()
            .unwrap();
        assert_close(series.up, 0.891, 1e-12);
        let parallel = Block::parse("parallel(0.99, 0.9)")
            .unwrap()
            .evaluate()
            .unwrap();
        assert_close(parallel.down, 0.001, 1e-12);
    }

    #[test]
    fn k_of_n_and_mttf_over_mttr_leaves() {
        let block = Block::parse("2of3(0.9, 0.9, 0.9)").unwrap();
        assert_close(block.evaluate().unwrap().up, 0.972, 1e-12);
        let leaf = Block::parse(" 720h / 1h ").unwrap().evaluate().unwrap();
        assert_close(leaf.up, 720.0 / 721.0, 1e-15);
        assert_close(leaf.down, 1.0 / 721.0, 1e-15);
        let nested = Block::parse("series(0.9995, 2of3(30d/1h, 30d/1h, 30d/1h))")
            .unwrap()
            .evaluate()
            .unwrap();
        let quorum_down =
            3.0 * (1.0f64 / 721.0).powi(2) * (720.0 / 721.0) + (1.0f64 / 721.0).powi(3);
        assert_close(nested.up, 0.9995 * (1.0 - quorum_down), 1e-12);
    }

    #[test]
    fn mistakes_are_named() {
        for (text, expected) in [
            ("series(0.9", "expected ')'"),
            ("2of3(0.9, 0.9)", "needs 3 blocks"),
            ("0of1(0.9)", "K must be"),
            ("triple(0.9)", "is not a block"),
            ("0.9 0.8", "unexpected text"),
            ("", "expected a number"),
        ] {
            let error = Block::parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        assert!(Block::parse("1.5").is_err());
        assert!(Block::parse(&"series(".repeat(100)).is_err());
    }
}
