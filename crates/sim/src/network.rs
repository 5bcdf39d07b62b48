//! The simulated network between members: one directed link per ordered pair, each with
//! its own delay, jitter (so messages of one link overtake each other), loss and
//! duplication, and a switch that cuts it.
//!
//! Cutting only some directed links gives one-way partitions; cutting both directions
//! between two groups gives symmetric ones. Whether a link is cut is looked up when a
//! message would arrive, not when it is sent, so a partition also catches messages
//! already on the wire, as a real one does. Random loss is decided at send time, silently,
//! the way a datagram disappears; a cut link or a stopped recipient is reported to the
//! sender instead, the way a failed TCP connection is.

use crate::config::RunConfig;
use crate::random::SimRandom;

/// The most messages on the wire at once. The real transport bounds its per-peer queues
/// (`peer_queue_messages_max`); a message beyond this is dropped and reported like one
/// that found a full queue.
pub const MESSAGES_IN_FLIGHT_MAX: usize = 50_000;

/// One directed link's behaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Cut: everything that would arrive is lost and reported.
    pub cut: bool,
    /// The least one-way delay.
    pub delay_ns: u64,
    /// Up to this much extra delay, drawn per message.
    pub jitter_ns: u64,
    /// Probability of silent loss, in parts per million.
    pub loss_ppm: u32,
    /// Probability that a message is delivered twice, in parts per million.
    pub duplicate_ppm: u32,
}

/// What happens to one sent message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendPlan {
    /// Lost on the way, silently.
    Lost,
    /// The send queue is full: dropped and reported to the sender at once.
    QueueFull,
    /// Delivered after each of these delays (two for a duplicate).
    Deliver(Vec<u64>),
}

/// Every link between the members.
#[derive(Debug)]
pub struct Network {
    member_count: usize,
    links: Vec<Link>,
    healthy: Link,
    messages_in_flight: usize,
}

impl Network {
    /// A network of healthy links for `config`'s members.
    pub fn new(config: &RunConfig) -> Network {
        let healthy = Link {
            cut: false,
            delay_ns: config.link_delay_ns,
            jitter_ns: config.link_jitter_ns,
            loss_ppm: 0,
            duplicate_ppm: 0,
        };
        Network {
            member_count: config.member_count,
            links: vec![healthy.clone(); config.member_count * config.member_count],
            healthy,
            messages_in_flight: 0,
        }
    }

    fn position(&self, from: u64, to: u64) -> usize {
        assert!(
            (1..=self.member_count as u64).contains(&from)
                && (1..=self.member_count as u64).contains(&to),
            "link {from}→{to} between unknown members"
        );
        (from as usize - 1) * self.member_count + (to as usize - 1)
    }

    /// The link from `from` to `to`.
    pub fn link(&self, from: u64, to: u64) -> &Link {
        &self.links[self.position(from, to)]
    }

    /// The link from `from` to `to`, to change it.
    pub fn link_mut(&mut self, from: u64, to: u64) -> &mut Link {
        let position = self.position(from, to);
        &mut self.links[position]
    }

    /// Restores every link to its healthy behaviour.
    pub fn heal(&mut self) {
        for link in &mut self.links {
            *link = self.healthy.clone();
        }
    }

    /// Restores every link's delay, loss and duplication, leaving cuts as they are.
    pub fn restore_quality(&mut self) {
        for link in &mut self.links {
            let cut = link.cut;
            *link = self.healthy.clone();
            link.cut = cut;
        }
    }

    /// Restores only the cut switches.
    pub fn reconnect(&mut self) {
        for link in &mut self.links {
            link.cut = false;
        }
    }

    /// Whether any link is cut.
    pub fn has_cut_link(&self) -> bool {
        self.links.iter().any(|link| link.cut)
    }

    /// Decides what happens to a message sent now from `from` to `to`.
    pub fn plan_send(&mut self, from: u64, to: u64, random: &mut SimRandom) -> SendPlan {
        if self.messages_in_flight >= MESSAGES_IN_FLIGHT_MAX {
            return SendPlan::QueueFull;
        }
        let link = self.link(from, to).clone();
        if random.chance(link.loss_ppm) {
            return SendPlan::Lost;
        }
        let draw_delay = |random: &mut SimRandom| link.delay_ns + random.below(link.jitter_ns + 1);
        let mut delays = vec![draw_delay(random)];
        if random.chance(link.duplicate_ppm) {
            delays.push(draw_delay(random));
        }
        self.messages_in_flight += delays.len();
        SendPlan::Deliver(delays)
    }

    /// Records that a message planned by [`Network::plan_send`] arrived or was dropped.
    pub fn message_left_wire(&mut self) {
        self.messages_in_flight = self
            .messages_in_flight
            .checked_sub(1)
            .expect("a message leaves the wire only after it was put on it");
    }

    /// Whether a message from `from` to `to` arriving now gets through the cut switches.
    pub fn is_cut(&self, from: u64, to: u64) -> bool {
        self.link(from, to).cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SimOptions;

    #[test]
    fn cut_links_are_directed_and_heal_restores_them() {
        let mut random = SimRandom::new(1);
        let config = RunConfig::from_seed(1, SimOptions::default(), &mut random);
        let mut network = Network::new(&config);
        network.link_mut(1, 2).cut = true;
        assert!(network.is_cut(1, 2));
        assert!(!network.is_cut(2, 1));
        assert!(network.has_cut_link());
        network.heal();
        assert!(!network.has_cut_link());
    }

    #[test]
    fn loss_and_duplication_follow_the_link() {
        let mut random = SimRandom::new(2);
        let config = RunConfig::from_seed(2, SimOptions::default(), &mut random);
        let mut network = Network::new(&config);
        network.link_mut(1, 2).loss_ppm = 1_000_000;
        assert_eq!(network.plan_send(1, 2, &mut random), SendPlan::Lost);
        network.link_mut(2, 1).duplicate_ppm = 1_000_000;
        let SendPlan::Deliver(delays) = network.plan_send(2, 1, &mut random) else {
            panic!("a healthy-but-duplicating link delivers");
        };
        assert_eq!(delays.len(), 2);
        network.message_left_wire();
        network.message_left_wire();
    }
}
