//! The clients' side of the world: sending requests, answering them, timing them out,
//! and recording each in the history the checkers read.
//!
//! A request travels to its member as a scheduled event (a client-to-member delay), so
//! that it can find the member stopped (refused: no effect) or paused (it waits). The
//! answer is recorded when the member produces it. A client that hears nothing within its
//! timeout records an unknown outcome and moves on; a late answer is then ignored, as a
//! real client that gave up ignores it.
//!
//! Keep-alives are answered by the leader only. A follower's server forwards one to the
//! leader it knows of, once; the simulator does the same with the member's "not leader"
//! answer. A keep-alive that fails or times out is left out of the history: it may have
//! extended the lease, which the checker allows anyway (an expiry may come late), and it
//! cannot have shortened it.

use std::collections::BTreeSet;

use keel_check::Bytes;
use keel_check::{Input, Operation, Output};
use keel_core::{Event, RequestError, Response, WriteRequest};
use keel_types::etcdserverpb::CompactionRequest;

use crate::client::{
    failure_answer, failure_outcome, output_for, read_output, request_for, ClientRole,
    FailureOutcome, Outstanding, Request, LIVENESS_KEY,
};
use crate::config::{MILLISECOND_NS, SECOND_NS};
use crate::trace::TraceEvent;
use crate::violation::Violation;
use crate::world::{Action, Phase, TokenOwner, World, HISTORY_OPERATIONS_MAX};

/// The longest a request takes from client to member.
pub const CLIENT_DELAY_NS_MAX: u64 = 2 * MILLISECOND_NS;

/// How long the liveness probe and the final reader wait before retrying a failure.
pub const RETRY_DELAY_NS: u64 = 200 * MILLISECOND_NS;

/// How a request ended, for the history.
enum Completion {
    /// Answered.
    Answer(Output),
    /// Failed, with or without a possible effect.
    Failure(FailureOutcome, String),
}

impl World {
    /// A client sends its next request, if its role still has work in this phase.
    pub(crate) fn on_client_send(&mut self, client: usize) {
        if self.clients[client].outstanding.is_some()
            || self.history.len() >= HISTORY_OPERATIONS_MAX
        {
            return;
        }
        let input = match self.clients[client].role {
            ClientRole::Workload => {
                if !matches!(self.phase, Phase::Faults | Phase::Liveness { .. }) {
                    return;
                }
                let now = self.now_ns();
                self.clients[client].next_workload_input(&self.config, &mut self.random, now)
            }
            ClientRole::LivenessProbe => {
                if !matches!(self.phase, Phase::Liveness { .. }) {
                    return;
                }
                self.clients[client].next_probe_input()
            }
            ClientRole::FinalReader => {
                let Some(key) = self.next_final_read_key() else {
                    return self.final_reads_done();
                };
                Input::Get {
                    key,
                    serializable: false,
                }
            }
        };
        let member = 1 + self.random.below(self.members.len() as u64);
        let now = self.now_ns();
        let client_state = &mut self.clients[client];
        client_state.request_number += 1;
        let request_number = client_state.request_number;
        client_state.outstanding = Some(Outstanding {
            request_number,
            member,
            input: input.clone(),
            call_time_ns: now,
            token: None,
            forwarded: false,
        });
        let client_id = client_state.id;
        self.record(TraceEvent::ClientCall {
            client: client_id,
            member,
            input,
        });
        let delay = self.random.below(CLIENT_DELAY_NS_MAX + 1);
        self.agenda.schedule_after(
            delay,
            Action::ClientArrive {
                client,
                request_number,
            },
        );
        self.agenda.schedule_after(
            self.config.client_timeout_ns,
            Action::ClientTimeout {
                client,
                request_number,
            },
        );
    }

    /// The next key the final reader reads: the workload's keys, every key put with a
    /// lease, then the probe's.
    fn next_final_read_key(&self) -> Option<Bytes> {
        let plain = (0..self.config.key_count).map(|number| Bytes::from(format!("k{number}")));
        let leased: BTreeSet<&Bytes> = self
            .history
            .iter()
            .filter_map(|operation| match &operation.input {
                Input::PutWithLease { key, .. } => Some(key),
                _ => None,
            })
            .collect();
        plain
            .chain(leased.into_iter().cloned())
            .chain(std::iter::once(Bytes::from(LIVENESS_KEY)))
            .nth(self.final_reads.len())
    }

    fn outstanding(&self, client: usize, request_number: u64) -> Option<&Outstanding> {
        self.clients[client]
            .outstanding
            .as_ref()
            .filter(|outstanding| outstanding.request_number == request_number)
    }

    /// A request reaches its member.
    pub(crate) fn on_client_arrive(&mut self, client: usize, request_number: u64) {
        let Some(outstanding) = self.outstanding(client, request_number) else {
            return;
        };
        let member_id = outstanding.member;
        let request = request_for(&outstanding.input);
        let input = outstanding.input.clone();
        let member = self.member(member_id);
        if !member.is_running() {
            return self.complete(
                client,
                Completion::Failure(FailureOutcome::NoEffect, "connection refused".to_owned()),
            );
        }
        if self.now_ns() < member.paused_until_ns {
            let resume_ns = member.paused_until_ns;
            return self.agenda.schedule_at(
                resume_ns,
                Action::ClientArrive {
                    client,
                    request_number,
                },
            );
        }
        if let Request::SerializableRead(range) = &request {
            let running = self
                .member(member_id)
                .running
                .as_ref()
                .expect("checked above");
            let completion = match running.node.range_local(range) {
                Ok(response) => match read_output(&input, &response) {
                    Ok(output) => Completion::Answer(output),
                    Err(text) => return self.fail(Violation::MalformedResponse(text)),
                },
                Err(error) => Completion::Failure(FailureOutcome::NoEffect, error.to_string()),
            };
            return self.complete(client, completion);
        }
        let token = self.next_token;
        self.next_token += 1;
        let event = match request {
            Request::Write(request) => Event::Write { token, request },
            Request::LinearizableRead(request) => Event::LinearizableRead { token, request },
            Request::KeepAlive(id) => Event::LeaseKeepAlive { token, id },
            Request::SerializableRead(_) => unreachable!("answered above"),
        };
        self.tokens.insert(
            token,
            TokenOwner {
                client,
                request_number,
            },
        );
        if let Some(outstanding) = self.clients[client].outstanding.as_mut() {
            outstanding.token = Some(token);
        }
        let running = self
            .member_mut(member_id)
            .running
            .as_mut()
            .expect("checked above");
        running.node.step(event);
        self.drive(member_id);
    }

    /// A member answered a client's request.
    pub(crate) fn on_client_reply(
        &mut self,
        owner: TokenOwner,
        result: Result<Response, RequestError>,
    ) {
        let Some(outstanding) = self.outstanding(owner.client, owner.request_number) else {
            return;
        };
        let completion = match result {
            Ok(response) => match output_for(&outstanding.input, &response) {
                Ok(output) => Completion::Answer(output),
                Err(text) => return self.fail(Violation::MalformedResponse(text)),
            },
            Err(RequestError::NotLeader { leader_id })
                if leader_id != 0 && !outstanding.forwarded =>
            {
                return self.forward_to_leader(owner.client, leader_id);
            }
            Err(error) => match failure_answer(&outstanding.input, &error) {
                Some(output) => Completion::Answer(output),
                None => Completion::Failure(failure_outcome(&error), error.to_string()),
            },
        };
        self.complete(owner.client, completion);
    }

    /// A follower's server forwards a keep-alive to the leader it knows of, once.
    fn forward_to_leader(&mut self, client: usize, leader: u64) {
        let outstanding = self.clients[client]
            .outstanding
            .as_mut()
            .expect("only an outstanding request is forwarded");
        if let Some(token) = outstanding.token.take() {
            self.tokens.remove(&token);
        }
        outstanding.member = leader;
        outstanding.forwarded = true;
        let request_number = outstanding.request_number;
        let client_id = self.clients[client].id;
        self.record(TraceEvent::ClientForwarded {
            client: client_id,
            leader,
        });
        let delay = self.random.below(CLIENT_DELAY_NS_MAX + 1);
        self.agenda.schedule_after(
            delay,
            Action::ClientArrive {
                client,
                request_number,
            },
        );
    }

    /// A client gives up waiting: what it asked may or may not have happened.
    pub(crate) fn on_client_timeout(&mut self, client: usize, request_number: u64) {
        if self.outstanding(client, request_number).is_some() {
            self.complete(
                client,
                Completion::Failure(FailureOutcome::Unknown, "client timeout".to_owned()),
            );
        }
    }

    /// Clients waiting on a member that stopped see their connection reset.
    pub(crate) fn reset_clients_of(&mut self, member: u64) {
        for client in 0..self.clients.len() {
            let waiting = self.clients[client]
                .outstanding
                .as_ref()
                .is_some_and(|outstanding| {
                    outstanding.member == member && outstanding.token.is_some()
                });
            if waiting {
                self.complete(
                    client,
                    Completion::Failure(FailureOutcome::Unknown, "connection reset".to_owned()),
                );
            }
        }
    }

    /// Records how a client's request ended and schedules its next one.
    fn complete(&mut self, client: usize, completion: Completion) {
        let now = self.now_ns();
        let outstanding = self.clients[client]
            .outstanding
            .take()
            .expect("only an outstanding request completes");
        if let Some(token) = outstanding.token {
            self.tokens.remove(&token);
        }
        let client_id = self.clients[client].id;
        let role = self.clients[client].role;
        // Reads and keep-alives that fail change nothing the history can observe.
        let is_write = !matches!(
            outstanding.input,
            Input::Get { .. } | Input::LeaseKeepAlive { .. }
        );
        let succeeded = matches!(completion, Completion::Answer(_));
        match completion {
            Completion::Answer(output) => {
                self.stats.operations_answered += 1;
                if outstanding.input.lease_id().is_some() {
                    self.stats.lease_operations_answered += 1;
                }
                self.clients[client].learn(&outstanding.input, &output);
                self.record(TraceEvent::ClientReturn {
                    client: client_id,
                    output: output.clone(),
                });
                if role == ClientRole::FinalReader {
                    let key = outstanding.input.key().expect("final reads name a key");
                    self.final_reads.push((key.clone(), output.clone()));
                }
                self.history.push(Operation {
                    client_id,
                    call_time: outstanding.call_time_ns,
                    return_time: Some(now),
                    input: outstanding.input,
                    output,
                });
            }
            Completion::Failure(outcome, reason) => {
                let unknown_outcome = outcome == FailureOutcome::Unknown && is_write;
                self.record(TraceEvent::ClientFailed {
                    client: client_id,
                    reason,
                    unknown_outcome,
                });
                if unknown_outcome {
                    self.stats.operations_unknown += 1;
                    self.history.push(Operation {
                        client_id,
                        call_time: outstanding.call_time_ns,
                        return_time: None,
                        input: outstanding.input,
                        output: Output::Unknown,
                    });
                } else {
                    self.stats.operations_refused += 1;
                }
            }
        }
        let delay = match role {
            ClientRole::Workload => self.random.below(self.config.client_think_ns_max + 1),
            ClientRole::LivenessProbe if succeeded => {
                self.liveness_proven();
                return;
            }
            ClientRole::LivenessProbe | ClientRole::FinalReader if !succeeded => RETRY_DELAY_NS,
            ClientRole::LivenessProbe | ClientRole::FinalReader => 0,
        };
        self.agenda
            .schedule_after(delay, Action::ClientSend { client });
    }

    /// An administrator compacts the history a little behind a member's revision, which
    /// makes snapshots carry compacted key spaces.
    pub(crate) fn on_compact(&mut self) {
        if self.phase != Phase::Faults {
            return;
        }
        let delay = self.random.between(1, 5) * SECOND_NS;
        self.agenda.schedule_after(delay, Action::Compact);
        let member = 1 + self.random.below(self.members.len() as u64);
        let behind = self.random.below(20) as i64;
        let token = self.next_token;
        self.next_token += 1;
        let Some(running) = self.member_mut(member).running.as_mut() else {
            return;
        };
        let revision = running.node.status().revision - behind;
        if revision <= 1 {
            return;
        }
        running.node.step(Event::Write {
            token,
            request: WriteRequest::Compaction(CompactionRequest {
                revision,
                physical: false,
            }),
        });
        self.record(TraceEvent::Fault(format!(
            "compaction to revision {revision} via member {member}"
        )));
        self.drive(member);
    }
}
