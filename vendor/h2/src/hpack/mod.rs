mod decoder;
// modelgate: the encoder's dynamic-table indexing (`Encoder::encode`, `Table::index`) is unused
// since header blocks are encoded by reference (`Encoder::encode_block`); kept, with the
// `Header` methods it uses, for h2's own tests and a later upgrade.
#[allow(dead_code)]
mod encoder;
#[allow(dead_code)]
pub(crate) mod header;
pub(crate) mod huffman;
#[allow(dead_code)]
mod table;

#[cfg(test)]
mod test;

pub use self::decoder::{Decoder, DecoderError, NeedMore};
pub use self::encoder::Encoder;
pub use self::header::{BytesStr, Header};
