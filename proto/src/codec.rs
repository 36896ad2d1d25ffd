//! The codec of the generated services: prost messages, encoded as
//! `tonic_prost::ProstCodec` encodes them, into a buffer sized first.
//!
//! tonic starts each encode buffer at 8 KiB and prost writes into it
//! without reserving, so a dense download of several MiB grows the buffer
//! by doubling: about twice the message in allocations and copies. This
//! encoder reserves the message's encoded length before writing it.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;

/// A codec of prost messages whose encoder reserves each message's length.
#[derive(Debug)]
pub struct ReservingCodec<T, U> {
    _messages: PhantomData<(T, U)>,
}

impl<T, U> Default for ReservingCodec<T, U> {
    fn default() -> Self {
        Self {
            _messages: PhantomData,
        }
    }
}

impl<T, U> Codec for ReservingCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ReservingEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ReservingEncoder {
            _message: PhantomData,
        }
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}

/// Encodes a prost message after reserving its encoded length.
#[derive(Debug)]
pub struct ReservingEncoder<T> {
    _message: PhantomData<T>,
}

impl<T: Message> Encoder for ReservingEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buffer: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buffer.reserve(item.encoded_len());
        item.encode(buffer)
            .map_err(|error| Status::internal(format!("failed to encode a message: {error}")))
    }
}
