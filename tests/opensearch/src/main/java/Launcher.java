import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Collection;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import org.apache.logging.log4j.LogManager;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.plugins.Plugin;
import org.opensearch.transport.Netty4Plugin;

/**
 * Single-node OpenSearch 2.19 embedded in one JVM, for integration tests.
 *
 * <pre>Launcher HOME HTTP_PORT</pre>
 *
 * HOME is created if missing (data in HOME/data, logs in HOME/logs); HTTP listens on
 * 127.0.0.1:HTTP_PORT. Blocks until the JVM is killed; a shutdown hook closes the node.
 */
public final class Launcher {

    /** Node's plugin-list constructor is protected in 2.x. */
    static final class EmbeddedNode extends Node {
        EmbeddedNode(Environment env, Collection<Class<? extends Plugin>> plugins) {
            super(env, plugins, true);
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 2) {
            System.err.println("usage: Launcher <home-dir> <http-port>");
            System.exit(2);
        }
        Path home = Path.of(args[0]).toAbsolutePath();
        int port = Integer.parseInt(args[1]);
        for (String d : new String[] {"config", "data", "logs", "modules", "plugins"}) {
            Files.createDirectories(home.resolve(d));
        }

        Settings settings = Settings.builder()
                .put("cluster.name", "pgferry-it")
                .put("node.name", "n1")
                .put("path.home", home.toString())
                .put("path.data", home.resolve("data").toString())
                .put("path.logs", home.resolve("logs").toString())
                .put("discovery.type", "single-node")
                .put("network.host", "127.0.0.1")
                .put("http.port", port)
                .put("transport.port", 0)
                .put("cluster.default_number_of_replicas", 0)
                .put("cluster.routing.allocation.disk.threshold_enabled", false)
                .put("node.portsfile", true)
                .put("action.auto_create_index", true)
                .build();

        Environment env = InternalSettingsPreparer.prepareEnvironment(
                settings, Map.of(), home.resolve("config"), () -> "n1");
        Node node = new EmbeddedNode(env, List.of(Netty4Plugin.class));

        CountDownLatch done = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                node.close();
                node.awaitClose(10, TimeUnit.SECONDS);
            } catch (Exception e) {
                e.printStackTrace();
            } finally {
                done.countDown();
                // log4j's own shutdown hook is disabled in log4j2.properties so that the
                // node's closing messages are still logged; flush it last.
                LogManager.shutdown();
            }
        }, "opensearch-shutdown"));

        Path ready = home.resolve("logs").resolve("ready");
        Files.deleteIfExists(ready);
        long t0 = System.nanoTime();
        try {
            node.start();
            // cluster.default_number_of_replicas is read from the cluster-state metadata
            // (persistent/transient cluster settings), NOT from node settings, so it is
            // applied here; otherwise every new index gets 1 replica and stays yellow.
            node.client().admin().cluster().prepareUpdateSettings()
                    .setPersistentSettings(Settings.builder()
                            .put("cluster.default_number_of_replicas", 0)
                            .put("cluster.routing.allocation.disk.threshold_enabled", false))
                    .get();
        } catch (Throwable t) {
            t.printStackTrace();
            System.exit(1);
        }
        // start.sh waits for this file: the node is fully configured once it exists.
        Files.writeString(ready, port + "\n");
        System.out.printf("opensearch node started on http://127.0.0.1:%d in %d ms%n",
                port, (System.nanoTime() - t0) / 1_000_000);
        System.out.flush();
        done.await();
    }
}
