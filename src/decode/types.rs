//! STUB (replaced by the values branch).
pub struct TypeRegistry;
impl TypeRegistry {
    pub fn builtin() -> Self {
        TypeRegistry
    }
    pub fn missing(&self, _oids: &[u32]) -> Vec<u32> {
        Vec::new()
    }
    pub async fn load(
        &mut self,
        _c: &tokio_postgres::Client,
        _oids: &[u32],
    ) -> Result<(), tokio_postgres::Error> {
        Ok(())
    }
}
