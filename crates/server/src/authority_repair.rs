//! Client connections as etcd clients really send them: repairing `:authority`.
//!
//! etcd 3.4's client dials some calls (`etcdctl endpoint status`, `endpoint
//! hashkv`, `defrag`, `snapshot save`, `move-leader`, and every endpoint of
//! `--cluster`) with the endpoint URL itself as the gRPC target, so the HTTP/2
//! `:authority` pseudo-header reads `http://127.0.0.1:2379`. Go's HTTP/2 server
//! (etcd's) ignores that; hyper's h2 refuses the request as malformed and resets
//! the stream with PROTOCOL_ERROR, so those etcdctl commands failed against keel
//! whenever the endpoint was written with its scheme.
//!
//! [`AuthorityRepair`] sits between an accepted client socket and tonic and
//! decodes the connection's first header block. If its `:authority` is well
//! formed (every client but those etcd 3.4 calls), the block goes on as it came
//! and the rest of the connection passes through untouched: a client keeps one
//! authority per connection (grpc-go does), and decoding every request cost 40%
//! of a member's CPU under a read load. Otherwise every header block of the
//! connection (HEADERS and CONTINUATION frames) is decoded with the client's
//! HPACK state and encoded again as literals that never touch the dynamic
//! table, with `scheme://` cut from `:authority`: re-encoding every block, not
//! only the broken ones, keeps the server's HPACK table empty, so the two sides
//! can never disagree about it. The server-to-client direction is untouched.
//!
//! Limits: a header frame is buffered whole only up to
//! [`HEADER_FRAME_BYTES_MAX`] (larger ones are passed on for h2 to refuse), and
//! one header block (HEADERS plus CONTINUATIONs) is at most
//! [`HEADER_BLOCK_BYTES_MAX`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The connection preface a client sends before its first frame (RFC 9113 §3.4).
const CLIENT_PREFACE_BYTES: usize = 24;
/// Every frame starts with a 9-byte header (RFC 9113 §4.1).
const FRAME_HEADER_BYTES: usize = 9;
const FRAME_TYPE_HEADERS: u8 = 0x1;
const FRAME_TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Stream dependency and weight of a HEADERS frame with the PRIORITY flag.
const PRIORITY_BYTES: usize = 5;
/// Largest header frame buffered whole: h2's (and the protocol's) default
/// SETTINGS_MAX_FRAME_SIZE, which a client must not exceed; a larger frame is
/// passed on untouched, and h2 refuses it.
pub const HEADER_FRAME_BYTES_MAX: usize = 16_384;
/// Largest header block assembled from HEADERS and CONTINUATION frames.
pub const HEADER_BLOCK_BYTES_MAX: usize = 1024 * 1024;
/// Largest HPACK dynamic table the client may ask for: the protocol's default,
/// which h2 does not raise.
const HPACK_TABLE_BYTES_MAX: usize = 4_096;
/// Bytes read from the socket at a time.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// A header block split over HEADERS and CONTINUATION frames, being assembled.
struct PendingHeaderBlock {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_BYTES]>,
    fragments: Vec<u8>,
    /// The frames as they came, to send on unchanged if the block needs no repair.
    original_frames: Vec<u8>,
}

/// What the connection's header blocks need, decided by the first one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No header block seen yet.
    Undecided,
    /// The first authority was well formed: pass everything through.
    Passthrough,
    /// The first authority carried a scheme: re-encode every header block.
    Rewrite,
}

/// An accepted client connection whose header blocks are re-encoded with a
/// well-formed `:authority`; see the module documentation.
pub struct AuthorityRepair<S> {
    inner: S,
    /// Bytes read from the socket: `buffer[..ready]` may be handed to the
    /// reader as they are, the rest is not yet examined.
    buffer: BytesMut,
    ready: usize,
    preface_remaining: usize,
    /// Bytes of a frame being passed through as it arrives.
    passthrough_remaining: usize,
    pending: Option<PendingHeaderBlock>,
    mode: Mode,
    decoder: loona_hpack::Decoder<'static>,
    end_of_input: bool,
    /// Where reads from the socket land before joining `buffer`.
    scratch: Box<[u8]>,
}

impl<S> AuthorityRepair<S> {
    /// Wraps a freshly accepted connection (before the client preface).
    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE_BYTES_MAX);
        AuthorityRepair {
            inner,
            buffer: BytesMut::with_capacity(READ_CHUNK_BYTES),
            ready: 0,
            preface_remaining: CLIENT_PREFACE_BYTES,
            passthrough_remaining: 0,
            pending: None,
            mode: Mode::Undecided,
            decoder,
            end_of_input: false,
            scratch: vec![0; READ_CHUNK_BYTES].into_boxed_slice(),
        }
    }

    /// Examines buffered bytes, marking complete frames ready and rewriting
    /// header frames in place.
    fn process(&mut self) -> io::Result<()> {
        loop {
            if self.mode == Mode::Passthrough {
                self.ready = self.buffer.len();
                return Ok(());
            }
            let available = self.buffer.len() - self.ready;
            if self.preface_remaining > 0 || self.passthrough_remaining > 0 {
                let remaining = if self.preface_remaining > 0 {
                    &mut self.preface_remaining
                } else {
                    &mut self.passthrough_remaining
                };
                let taken = available.min(*remaining);
                *remaining -= taken;
                self.ready += taken;
                if *remaining > 0 {
                    return Ok(());
                }
                continue;
            }
            if available < FRAME_HEADER_BYTES {
                return Ok(());
            }
            let header = &self.buffer[self.ready..self.ready + FRAME_HEADER_BYTES];
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let frame_type = header[3];
            let is_header_frame =
                frame_type == FRAME_TYPE_HEADERS || frame_type == FRAME_TYPE_CONTINUATION;
            if !is_header_frame || length > HEADER_FRAME_BYTES_MAX {
                self.passthrough_remaining = FRAME_HEADER_BYTES + length;
                continue;
            }
            if available < FRAME_HEADER_BYTES + length {
                return Ok(());
            }
            let frame_end = self.ready + FRAME_HEADER_BYTES + length;
            let frame = self.buffer[self.ready..frame_end].to_vec();
            let replacement = self.rewrite_header_frame(&frame)?;
            let tail = self.buffer.split_off(frame_end);
            self.buffer.truncate(self.ready);
            self.buffer.extend_from_slice(&replacement);
            self.ready += replacement.len();
            self.buffer.unsplit(tail);
        }
    }

    /// What to send on in place of one HEADERS or CONTINUATION frame: nothing
    /// while a block is incomplete, the re-encoded block once it is complete.
    /// A frame that breaks the protocol is passed on for h2 to refuse.
    fn rewrite_header_frame(&mut self, frame: &[u8]) -> io::Result<Vec<u8>> {
        let frame_type = frame[3];
        let flags = frame[4];
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let mut payload = &frame[FRAME_HEADER_BYTES..];
        if frame_type == FRAME_TYPE_HEADERS {
            if self.pending.is_some() {
                return Ok(frame.to_vec());
            }
            if flags & FLAG_PADDED != 0 {
                let Some((&padding, rest)) = payload.split_first() else {
                    return Ok(frame.to_vec());
                };
                if padding as usize > rest.len() {
                    return Ok(frame.to_vec());
                }
                payload = &rest[..rest.len() - padding as usize];
            }
            let mut priority = None;
            if flags & FLAG_PRIORITY != 0 {
                if payload.len() < PRIORITY_BYTES {
                    return Ok(frame.to_vec());
                }
                let mut bytes = [0; PRIORITY_BYTES];
                bytes.copy_from_slice(&payload[..PRIORITY_BYTES]);
                priority = Some(bytes);
                payload = &payload[PRIORITY_BYTES..];
            }
            self.pending = Some(PendingHeaderBlock {
                stream_id,
                end_stream: flags & FLAG_END_STREAM != 0,
                priority,
                fragments: Vec::new(),
                original_frames: Vec::new(),
            });
        } else {
            match &self.pending {
                Some(pending) if pending.stream_id == stream_id => {}
                _ => return Ok(frame.to_vec()),
            }
        }
        let pending = self.pending.as_mut().expect("set above");
        if pending.fragments.len() + payload.len() > HEADER_BLOCK_BYTES_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a header block over {HEADER_BLOCK_BYTES_MAX} bytes"),
            ));
        }
        pending.fragments.extend_from_slice(payload);
        if self.mode == Mode::Undecided {
            pending.original_frames.extend_from_slice(frame);
        }
        if flags & FLAG_END_HEADERS == 0 {
            return Ok(Vec::new());
        }
        let pending = self.pending.take().expect("set above");
        let headers = self.decode(&pending.fragments)?;
        if self.mode == Mode::Undecided {
            let needs_repair = headers.iter().any(|(name, value)| {
                name.as_slice() == b":authority" && repaired_authority(value) != value.as_slice()
            });
            if !needs_repair {
                self.mode = Mode::Passthrough;
                return Ok(pending.original_frames);
            }
            self.mode = Mode::Rewrite;
        }
        let mut block = Vec::with_capacity(pending.fragments.len() * 2);
        for (name, value) in &headers {
            let value = if name.as_slice() == b":authority" {
                repaired_authority(value)
            } else {
                value
            };
            encode_literal_without_indexing(name, value, &mut block);
        }
        Ok(frames_for_block(&pending, &block))
    }

    /// Decodes one complete header block with the client's HPACK state.
    fn decode(&mut self, block: &[u8]) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut headers = Vec::new();
        self.decoder
            .decode_with_cb(block, |name, value| {
                headers.push((name.into_owned(), value.into_owned()));
            })
            .map_err(|error| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("undecodable HPACK header block: {error}"),
                )
            })?;
        Ok(headers)
    }
}

/// The authority without a `scheme://` in front or a path behind.
fn repaired_authority(value: &[u8]) -> &[u8] {
    let without_scheme = value
        .windows(3)
        .position(|window| window == b"://")
        .map_or(value, |position| &value[position + 3..]);
    let end = without_scheme
        .iter()
        .position(|&byte| byte == b'/')
        .unwrap_or(without_scheme.len());
    &without_scheme[..end]
}

/// HPACK's "literal header field without indexing, new name" with raw (not
/// Huffman-coded) strings (RFC 7541 §6.2.2).
fn encode_literal_without_indexing(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    for string in [name, value] {
        loona_hpack::encoder::encode_integer_into(string.len(), 7, 0, out)
            .expect("writing to a Vec cannot fail");
        out.extend_from_slice(string);
    }
}

/// One HEADERS frame, and CONTINUATION frames when the block does not fit.
fn frames_for_block(pending: &PendingHeaderBlock, block: &[u8]) -> Vec<u8> {
    let mut frames = Vec::with_capacity(block.len() + 2 * FRAME_HEADER_BYTES + PRIORITY_BYTES);
    let priority = pending
        .priority
        .as_ref()
        .map_or(&[][..], |bytes| &bytes[..]);
    let first_capacity = HEADER_FRAME_BYTES_MAX - priority.len();
    let (first, mut rest) = block.split_at(block.len().min(first_capacity));
    let mut flags = 0;
    if pending.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if pending.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    push_frame(
        &mut frames,
        FRAME_TYPE_HEADERS,
        flags,
        pending.stream_id,
        &[priority, first],
    );
    while !rest.is_empty() {
        let (fragment, remaining) = rest.split_at(rest.len().min(HEADER_FRAME_BYTES_MAX));
        rest = remaining;
        let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        push_frame(
            &mut frames,
            FRAME_TYPE_CONTINUATION,
            flags,
            pending.stream_id,
            &[fragment],
        );
    }
    frames
}

fn push_frame(out: &mut Vec<u8>, frame_type: u8, flags: u8, stream_id: u32, parts: &[&[u8]]) {
    let length = parts.iter().map(|part| part.len()).sum::<usize>() as u32;
    out.extend_from_slice(&length.to_be_bytes()[1..]);
    out.push(frame_type);
    out.push(flags);
    out.extend_from_slice(&stream_id.to_be_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityRepair<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        output: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.mode == Mode::Passthrough && this.buffer.is_empty() {
            return Pin::new(&mut this.inner).poll_read(context, output);
        }
        loop {
            if this.ready > 0 {
                let count = this.ready.min(output.remaining());
                output.put_slice(&this.buffer[..count]);
                this.buffer.advance(count);
                this.ready -= count;
                return Poll::Ready(Ok(()));
            }
            if this.end_of_input {
                // Whatever is left is an incomplete frame: hand it on, and
                // let h2 report the truncated connection.
                let count = this.buffer.len().min(output.remaining());
                output.put_slice(&this.buffer[..count]);
                this.buffer.advance(count);
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(&mut this.scratch[..]);
            match Pin::new(&mut this.inner).poll_read(context, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(())) => {
                    if read.filled().is_empty() {
                        this.end_of_input = true;
                        continue;
                    }
                    this.buffer.extend_from_slice(read.filled());
                    this.process()?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityRepair<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(context, bytes)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(context)
    }
}

impl tonic::transport::server::Connected for AuthorityRepair<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    const PREFACE: &[u8; CLIENT_PREFACE_BYTES] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(frame_type: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        push_frame(&mut out, frame_type, flags, stream_id, &[payload]);
        out
    }

    /// Reads what the adapter makes of `input`, delivered in `chunk`-byte reads.
    async fn repaired(input: Vec<u8>, chunk: usize) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in input.chunks(chunk) {
                client.write_all(piece).await.unwrap();
            }
        });
        let mut repair = AuthorityRepair::new(server);
        let mut output = Vec::new();
        // The writer drops its end when done, which ends the read.
        repair.read_to_end(&mut output).await.unwrap();
        writer.await.unwrap();
        output
    }

    type Headers = Vec<(Vec<u8>, Vec<u8>)>;
    /// A frame as h2 would see it: type, flags, stream, decoded headers, payload.
    type SeenFrame = (u8, u8, u32, Headers, Vec<u8>);

    /// Splits frames after the preface and decodes header blocks with a fresh
    /// decoder, as h2 would.
    fn frames_of(bytes: &[u8]) -> Vec<SeenFrame> {
        assert_eq!(&bytes[..CLIENT_PREFACE_BYTES], PREFACE);
        let mut decoder = loona_hpack::Decoder::new();
        let mut rest = &bytes[CLIENT_PREFACE_BYTES..];
        let mut frames = Vec::new();
        let mut block = Vec::new();
        while !rest.is_empty() {
            let length = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let (frame_type, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            let mut payload = &rest[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + length];
            rest = &rest[FRAME_HEADER_BYTES + length..];
            if frame_type == FRAME_TYPE_HEADERS || frame_type == FRAME_TYPE_CONTINUATION {
                if flags & FLAG_PRIORITY != 0 {
                    payload = &payload[PRIORITY_BYTES..];
                }
                block.extend_from_slice(payload);
                let headers = if flags & FLAG_END_HEADERS != 0 {
                    let headers = decoder.decode(&block).unwrap();
                    block.clear();
                    headers
                } else {
                    Vec::new()
                };
                frames.push((frame_type, flags, stream, headers, Vec::new()));
            } else {
                frames.push((frame_type, flags, stream, Vec::new(), payload.to_vec()));
            }
        }
        frames
    }

    fn request_headers(authority: &str, path: &str) -> Headers {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        .into_iter()
        .map(|(name, value)| (name.as_bytes().to_vec(), value.as_bytes().to_vec()))
        .collect()
    }

    fn encode(encoder: &mut loona_hpack::Encoder<'_>, headers: &Headers) -> Vec<u8> {
        encoder.encode(
            headers
                .iter()
                .map(|(name, value)| (name.as_slice(), value.as_slice())),
        )
    }

    #[tokio::test]
    async fn authority_with_a_scheme_is_repaired_and_other_frames_pass_unchanged() {
        // The client's encoder indexes headers, so the second request refers
        // to the first one's entries in the dynamic table.
        let mut encoder = loona_hpack::Encoder::new();
        let first = request_headers("http://127.0.0.1:2379", "/etcdserverpb.Maintenance/Status");
        let second = request_headers("http://127.0.0.1:2379", "/etcdserverpb.KV/Range");
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])); // SETTINGS
        let first_block = encode(&mut encoder, &first);
        input.extend(frame(FRAME_TYPE_HEADERS, FLAG_END_HEADERS, 1, &first_block));
        input.extend(frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\x02ab")); // DATA
                                                                         // The second block: padded, with a priority, split over a CONTINUATION.
        let second_block = encode(&mut encoder, &second);
        let (head, tail) = second_block.split_at(2);
        let mut padded = vec![3];
        padded.extend_from_slice(&[0, 0, 0, 0, 16]);
        padded.extend_from_slice(head);
        padded.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(
            FRAME_TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY,
            3,
            &padded,
        ));
        input.extend(frame(FRAME_TYPE_CONTINUATION, FLAG_END_HEADERS, 3, tail));

        for chunk in [1, 7, 4096] {
            let frames = frames_of(&repaired(input.clone(), chunk).await);
            assert_eq!(frames.len(), 4, "chunk {chunk}");
            assert_eq!(frames[0].0, 0x4);
            assert_eq!(frames[0].4, vec![0, 3, 0, 0, 0, 100]);
            let repaired_first =
                request_headers("127.0.0.1:2379", "/etcdserverpb.Maintenance/Status");
            assert_eq!(frames[1].3, repaired_first);
            assert_eq!(frames[1].1, FLAG_END_HEADERS);
            assert_eq!(
                (frames[2].0, frames[2].4.as_slice()),
                (0x0, &b"\0\0\0\0\x02ab"[..])
            );
            assert_eq!(
                frames[3].3,
                request_headers("127.0.0.1:2379", "/etcdserverpb.KV/Range")
            );
            assert_eq!(frames[3].1, FLAG_END_HEADERS | FLAG_PRIORITY);
            assert_eq!(frames[3].2, 3);
        }
    }

    #[tokio::test]
    async fn a_connection_whose_first_authority_is_well_formed_passes_unchanged() {
        let mut encoder = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        for (stream, path) in [(1, "/etcdserverpb.KV/Put"), (3, "/etcdserverpb.KV/Range")] {
            let block = encode(&mut encoder, &request_headers("127.0.0.1:2379", path));
            input.extend(frame(FRAME_TYPE_HEADERS, FLAG_END_HEADERS, stream, &block));
            input.extend(frame(0x0, FLAG_END_STREAM, stream, b"\0\0\0\0\x02ab"));
        }
        for chunk in [1, 5, 4096] {
            assert_eq!(repaired(input.clone(), chunk).await, input, "chunk {chunk}");
        }
    }

    #[test]
    fn authorities_lose_scheme_and_path_only() {
        assert_eq!(
            repaired_authority(b"http://10.0.0.1:2379"),
            b"10.0.0.1:2379"
        );
        assert_eq!(repaired_authority(b"https://host:2379/x"), b"host:2379");
        assert_eq!(repaired_authority(b"127.0.0.1:2379"), b"127.0.0.1:2379");
        assert_eq!(repaired_authority(b"localhost"), b"localhost");
    }

    #[tokio::test]
    async fn an_oversized_header_block_closes_the_connection() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(FRAME_TYPE_HEADERS, 0, 1, &[0x82]));
        let continuation = vec![0x82; HEADER_FRAME_BYTES_MAX];
        for _ in 0..=HEADER_BLOCK_BYTES_MAX / HEADER_FRAME_BYTES_MAX {
            input.extend(frame(FRAME_TYPE_CONTINUATION, 0, 1, &continuation));
        }
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = client.write_all(&input).await;
        });
        let mut repair = AuthorityRepair::new(server);
        let mut output = Vec::new();
        let error = repair.read_to_end(&mut output).await.unwrap_err();
        assert!(error.to_string().contains("header block over"), "{error}");
    }
}
