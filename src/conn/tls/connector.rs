//! [`MakeRustls`]: the same TLS setup for tokio-postgres's SQL connections,
//! as its `MakeTlsConnect`/`TlsConnect` traits want it, with the channel
//! binding end point for SCRAM.

use super::*;

/// tokio-postgres's TLS for the SQL connections: the shared configuration,
/// with what the last handshake found kept for `check`.
#[derive(Clone)]
pub struct MakeRustls {
    setup: Arc<TlsSetup>,
    pub info: Arc<Mutex<Option<TlsInfo>>>,
    /// Set when a server agreed to TLS and the handshake began: a failure
    /// after that is one `sslmode=prefer` retries without TLS.
    pub tried: Arc<AtomicBool>,
}

impl MakeRustls {
    pub fn new(setup: Arc<TlsSetup>) -> MakeRustls {
        MakeRustls {
            setup,
            info: Default::default(),
            tried: Default::default(),
        }
    }
}

pub struct RustlsConnect {
    setup: Arc<TlsSetup>,
    host: String,
    info: Arc<Mutex<Option<TlsInfo>>>,
    tried: Arc<AtomicBool>,
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, TlsError> {
        Ok(RustlsConnect {
            setup: self.setup.clone(),
            host: domain.to_string(),
            info: self.info.clone(),
            tried: self.tried.clone(),
        })
    }
}

impl<S> tokio_postgres::tls::TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, Self::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            self.tried.store(true, Ordering::Relaxed);
            let connector = self
                .setup
                .connector()
                .ok_or_else(|| TlsError("TLS asked for with sslmode=disable".into()))?;
            let name = server_name(&self.host)?;
            let tls = match connector.connect(name, stream).await {
                Ok(t) => t,
                Err(e) => {
                    return Err(match explain(e, &self.setup, &self.host) {
                        Ok(io) => io.into(),
                        Err(t) => t.into(),
                    })
                }
            };
            let (_, conn) = tls.get_ref();
            *self.info.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(TlsInfo::of(conn, &self.host, self.setup.mode));
            let end_point = end_point(conn);
            Ok(RustlsStream {
                inner: Box::new(tls),
                end_point,
            })
        })
    }
}

/// A TLS stream for tokio-postgres, with its channel-binding data.
pub struct RustlsStream<S> {
    inner: Box<tokio_rustls::client::TlsStream<S>>,
    end_point: Option<Vec<u8>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match &self.end_point {
            Some(h) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(h.clone()),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().inner.as_mut()).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().inner.as_mut()).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().inner.as_mut()).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().inner.as_mut()).poll_shutdown(cx)
    }
}
