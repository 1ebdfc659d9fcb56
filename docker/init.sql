-- The worked example's table (README: "Worked example: cache-aside").
CREATE TABLE products (
    id int PRIMARY KEY,
    name text NOT NULL,
    price numeric(10,2),
    tags text[],
    attrs jsonb,
    description text,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- pgferry creates its publication and slot at its first start, and its
-- initial snapshot (snapshot = "initial" in pgferry.toml) loads these rows.

INSERT INTO products (id, name, price, tags, attrs, description) VALUES
    (1, 'pen', 1.50, '{office}', '{"color": "blue"}', 'A ballpoint pen.'),
    (2, 'ink', 12.00, '{office,refill}', '{"ml": 50}', 'A bottle of ink for fountain pens.'),
    (3, 'notebook', 4.25, '{office,paper}', '{"pages": 96, "ruled": true}', 'A5, 96 pages.');
