//! STUB (replaced by the values branch).
use super::types::TypeRegistry;
#[derive(Debug)]
pub struct ValueError;
pub fn render(
    _r: &TypeRegistry,
    _oid: u32,
    text: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ValueError> {
    write_json_string(text, out);
    Ok(())
}
pub fn write_json_string(s: &[u8], out: &mut Vec<u8>) {
    crate::event::json_str(s, out)
}
