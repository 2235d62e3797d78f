//! A prost codec that reports client mistakes with client status codes.
//!
//! tonic's default prost codec maps every protobuf decode failure (a body that
//! is not protobuf, a string field holding invalid UTF-8) to `INTERNAL`, which
//! tells the caller the vault broke when it was the request. This codec maps
//! them to `INVALID_ARGUMENT`, and a message over [`MAX_MESSAGE_BYTES`] to
//! `RESOURCE_EXHAUSTED`. Error messages describe the problem, never the bytes.

use std::marker::PhantomData;

use bytes::Buf;
use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

/// Largest request message the vault decodes: 4 MiB.
///
/// The transport's own limit is set above this (see the server), so messages
/// between the two get the precise `RESOURCE_EXHAUSTED` from here.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Codec used by all generated `ordervault.v1` clients and servers.
#[derive(Debug, Clone)]
pub struct StrictCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder { _pd: PhantomData }
    }
}

/// Decodes a prost message, mapping failures to client status codes.
#[derive(Debug)]
pub struct StrictDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let len = buf.remaining();
        if len > MAX_MESSAGE_BYTES {
            return Err(Status::resource_exhausted(format!(
                "message of {len} bytes is over the limit of {MAX_MESSAGE_BYTES} bytes; \
                 split the request into smaller batches"
            )));
        }
        U::decode(buf).map(Some).map_err(|e| {
            // prost's DecodeError names the failing field path and the
            // problem (e.g. "invalid string value: data is not UTF-8
            // encoded"), never the offending bytes.
            Status::invalid_argument(format!(
                "request is not a valid ordervault.v1 protobuf message: {e}"
            ))
        })
    }
}
