import java.io.IOException;
import java.io.PrintStream;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;

import kafka.server.KafkaConfig;
import kafka.server.KafkaRaftServer;
import org.apache.kafka.common.Uuid;
import org.apache.kafka.common.utils.Time;
import org.apache.kafka.metadata.storage.Formatter;
import org.apache.kafka.server.common.MetadataVersion;
import org.apache.logging.log4j.LogManager;

/**
 * Single-node Apache Kafka 4.x in KRaft mode (one process that is both broker and
 * controller), embedded in one JVM, for integration tests.
 *
 * <pre>Launcher HOME PORT</pre>
 *
 * Clients connect to PLAINTEXT 127.0.0.1:PORT. HOME is created if missing; the log
 * directory HOME/data is formatted on first start (as kafka-storage.sh format would do)
 * and reused on a restart with the same HOME, so a test can stop and restart the broker
 * without losing topics. The controller listens on a loopback port chosen at first start
 * and kept in HOME/controller.port. HOME/ready is written once the broker is unfenced and
 * serving. Blocks until the JVM is killed; a shutdown hook stops the server.
 */
public final class Launcher {

    private static final int NODE_ID = 1;

    public static void main(String[] args) throws Exception {
        if (args.length != 2) {
            System.err.println("usage: Launcher <home-dir> <port>");
            System.exit(2);
        }
        Path home = Path.of(args[0]).toAbsolutePath();
        int port = Integer.parseInt(args[1]);
        Path data = home.resolve("data");
        Files.createDirectories(data);
        Path ready = home.resolve("ready");
        Files.deleteIfExists(ready);
        int controllerPort = controllerPort(home);

        Properties p = new Properties();
        p.put("process.roles", "broker,controller");
        p.put("node.id", String.valueOf(NODE_ID));
        p.put("controller.quorum.voters", NODE_ID + "@127.0.0.1:" + controllerPort);
        p.put("listeners", "PLAINTEXT://127.0.0.1:" + port + ",CONTROLLER://127.0.0.1:" + controllerPort);
        p.put("advertised.listeners", "PLAINTEXT://127.0.0.1:" + port);
        p.put("controller.listener.names", "CONTROLLER");
        p.put("inter.broker.listener.name", "PLAINTEXT");
        p.put("listener.security.protocol.map", "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT");
        p.put("log.dirs", data.toString());
        // One node: every internal topic must have replication factor 1 and min ISR 1,
        // or transactions (__transaction_state) and consumer groups (__consumer_offsets)
        // never become available.
        p.put("offsets.topic.replication.factor", "1");
        p.put("offsets.topic.num.partitions", "1");
        p.put("transaction.state.log.replication.factor", "1");
        p.put("transaction.state.log.min.isr", "1");
        p.put("transaction.state.log.num.partitions", "1");
        p.put("share.coordinator.state.topic.replication.factor", "1");
        p.put("share.coordinator.state.topic.min.isr", "1");
        p.put("default.replication.factor", "1");
        p.put("min.insync.replicas", "1");
        // Auto-created topics get 3 partitions, so that per-key ordering is exercised.
        p.put("num.partitions", System.getProperty("kafka.num.partitions", "3"));
        p.put("auto.create.topics.enable", "true");
        p.put("group.initial.rebalance.delay.ms", "0");
        // After a SIGKILL the restarted broker waits until the controller has fenced its
        // previous incarnation, i.e. one session timeout (default 9 s, heartbeats every 2 s).
        p.put("broker.session.timeout.ms", "4000");
        p.put("broker.heartbeat.interval.ms", "1000");
        // A small machine: fewer threads and a small log-cleaner buffer (compaction still runs).
        p.put("num.network.threads", "2");
        p.put("num.io.threads", "4");
        p.put("background.threads", "4");
        p.put("log.cleaner.threads", "1");
        p.put("log.cleaner.dedupe.buffer.size", String.valueOf(16 * 1024 * 1024));

        KafkaConfig config = KafkaConfig.fromProps(p, false);

        if (!Files.exists(data.resolve("meta.properties"))) {
            String clusterId = Uuid.randomUuid().toString();
            new Formatter()
                    .setPrintStream(System.out)
                    .setNodeId(NODE_ID)
                    .setClusterId(clusterId)
                    .setDirectories(List.of(data.toString()))
                    .setMetadataLogDirectory(data.toString())
                    .setControllerListenerName("CONTROLLER")
                    .setReleaseVersion(MetadataVersion.latestProduction())
                    // Static voters (controller.quorum.voters), as kafka-storage.sh does
                    // for a node whose roles include the controller.
                    .setHasDynamicQuorum(false)
                    .setWriteBootstrapSnapshot(true)
                    .run();
        }

        KafkaRaftServer server = new KafkaRaftServer(config, Time.SYSTEM);
        CountDownLatch done = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                server.shutdown();
                server.awaitShutdown();
            } catch (Throwable t) {
                t.printStackTrace();
            } finally {
                done.countDown();
                // log4j's own shutdown hook is disabled (log4j2.properties) so that the
                // server's closing messages are still logged; flush it last.
                LogManager.shutdown();
            }
        }, "kafka-shutdown"));

        long t0 = System.nanoTime();
        try {
            // Returns once the broker is registered, unfenced and its listeners accept.
            server.startup();
        } catch (Throwable t) {
            t.printStackTrace();
            System.exit(1);
        }
        Files.writeString(ready, port + "\n");
        PrintStream out = System.out;
        out.printf("kafka broker started on 127.0.0.1:%d (controller %d) in %d ms%n",
                port, controllerPort, (System.nanoTime() - t0) / 1_000_000);
        out.flush();
        done.await();
    }

    /** The controller's port: chosen once per HOME and reused on restart. */
    private static int controllerPort(Path home) throws IOException {
        Path f = home.resolve("controller.port");
        if (Files.exists(f)) {
            return Integer.parseInt(Files.readString(f).trim());
        }
        int port;
        try (ServerSocket s = new ServerSocket(0, 1, InetAddress.getLoopbackAddress())) {
            port = s.getLocalPort();
        }
        Files.writeString(f, port + "\n");
        return port;
    }
}
