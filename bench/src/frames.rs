//! A client-side frame scanner that counts messages without buffering them.
//!
//! The load client must not hold a 1 GB message in memory to count it, so unlike
//! `pnp_wire::frame::FrameDecoder` this keeps only the 5-byte header, the first 8 payload bytes
//! (the upstream's timestamp) and gRPC-Web trailer blocks (small).

/// A complete frame as the scanner saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameEvent {
    /// A message of `len` bytes; `stamp` is its first 8 bytes as a little-endian u64, if it had
    /// that many.
    Message {
        /// Payload length.
        len: u64,
        /// The upstream's send time (paced messages) or whatever the first 8 bytes were.
        stamp: Option<u64>,
    },
    /// A gRPC-Web trailer frame and its grpc-status (`None` if absent or unreadable).
    Trailers(Option<u32>),
}

/// Incremental scanner; feed it chunks split anywhere.
#[derive(Debug, Default)]
pub struct FrameScanner {
    header: [u8; 5],
    header_len: usize,
    remaining: u64,
    len: u64,
    prefix: [u8; 8],
    prefix_len: usize,
    trailer: Option<Vec<u8>>,
    bytes: u64,
}

impl FrameScanner {
    /// A scanner at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Payload and header bytes seen so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes of an unfinished frame are pending.
    pub fn in_frame(&self) -> bool {
        self.header_len > 0
    }

    /// Scan `data`, reporting every frame it completes.
    pub fn push(&mut self, mut data: &[u8], mut on: impl FnMut(FrameEvent)) {
        self.bytes += data.len() as u64;
        while !data.is_empty() {
            if self.header_len < 5 {
                let n = (5 - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
                self.header_len += n;
                data = &data[n..];
                if self.header_len < 5 {
                    return;
                }
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as u64;
                self.len = len;
                self.remaining = len;
                self.prefix_len = 0;
                self.trailer = (self.header[0] & 0x80 != 0).then(Vec::new);
                if len == 0 {
                    self.complete(&mut on);
                }
                continue;
            }
            let n = (self.remaining.min(data.len() as u64)) as usize;
            let (payload, rest) = data.split_at(n);
            if self.prefix_len < 8 {
                let p = (8 - self.prefix_len).min(payload.len());
                self.prefix[self.prefix_len..self.prefix_len + p].copy_from_slice(&payload[..p]);
                self.prefix_len += p;
            }
            if let Some(trailer) = self.trailer.as_mut() {
                trailer.extend_from_slice(payload);
            }
            self.remaining -= n as u64;
            data = rest;
            if self.remaining == 0 {
                self.complete(&mut on);
            }
        }
    }

    fn complete(&mut self, on: &mut impl FnMut(FrameEvent)) {
        self.header_len = 0;
        match self.trailer.take() {
            Some(block) => on(FrameEvent::Trailers(status_in_block(&block))),
            None => on(FrameEvent::Message {
                len: self.len,
                stamp: (self.prefix_len == 8).then(|| u64::from_le_bytes(self.prefix)),
            }),
        }
    }
}

/// The `grpc-status` in a gRPC-Web trailer block (`name:value\r\n` lines).
pub fn status_in_block(block: &[u8]) -> Option<u32> {
    block.split(|&b| b == b'\n').find_map(|line| {
        let line = std::str::from_utf8(line).ok()?.trim();
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("grpc-status")
            .then(|| value.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_split_frames_and_trailers() {
        let mut scanner = FrameScanner::new();
        let mut events = Vec::new();
        let block = b"grpc-status: 0\r\n";
        let mut wire = Vec::new();
        wire.extend_from_slice(&crate::service::frame(&7u64.to_le_bytes()));
        wire.extend_from_slice(&crate::service::frame(&[1, 2]));
        wire.extend_from_slice(&[0x80, 0, 0, 0, block.len() as u8]);
        wire.extend_from_slice(block);
        for byte in &wire {
            scanner.push(std::slice::from_ref(byte), |e| events.push(e));
        }
        assert_eq!(
            events,
            vec![
                FrameEvent::Message {
                    len: 8,
                    stamp: Some(7)
                },
                FrameEvent::Message {
                    len: 2,
                    stamp: None
                },
                FrameEvent::Trailers(Some(0)),
            ]
        );
        assert!(!scanner.in_frame());
    }
}
