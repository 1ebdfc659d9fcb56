//! From pgoutput messages to change events: relation cache, value rendering
//! (`to_jsonb()`-exact) and transaction assembly. No network I/O happens here;
//! the connection layer loads missing type information before it hands over a
//! Relation message.

pub mod assembler;
pub mod types;
pub mod value;
