//! Tree-sitter extraction: the functions, methods, named arrow functions, classes and types
//! of one file, with the comment above each (JSDoc, `///`, `#`) or its docstring, its
//! signature and body split, its container (class, impl, receiver type) and the names it
//! uses. One table per language says which node kinds are which; the walk is shared.

use std::ops::Range;

use tree_sitter::{Node, Parser};

use super::walk::Lang;

/// What an extracted item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ItemKind {
    Function,
    Method,
    /// An arrow function or function expression bound to a name.
    Arrow,
    Class,
    Interface,
    TypeAlias,
    Enum,
    Struct,
    Trait,
}

impl ItemKind {
    pub fn is_callable(self) -> bool {
        matches!(
            self,
            ItemKind::Function | ItemKind::Method | ItemKind::Arrow
        )
    }

    /// The word a prompt uses.
    pub fn word(self) -> &'static str {
        match self {
            ItemKind::Function | ItemKind::Arrow => "function",
            ItemKind::Method => "method",
            ItemKind::Class => "class",
            ItemKind::Interface => "interface",
            ItemKind::TypeAlias => "type",
            ItemKind::Enum => "enum",
            ItemKind::Struct => "struct",
            ItemKind::Trait => "trait",
        }
    }
}

/// One extracted declaration; ranges index the file's text.
#[derive(Debug, Clone)]
pub struct Item {
    pub kind: ItemKind,
    pub name: String,
    /// Index into [`Parsed::containers`] for methods.
    pub container: Option<usize>,
    /// The whole declaration, with `export`, decorators and the like, without its comment.
    pub span: Range<usize>,
    /// The body (callables only). For a Python function with a docstring the body starts
    /// after the docstring, at the start of its line.
    pub body: Option<Range<usize>>,
    /// Where the signature ends: the body node's start (before any docstring).
    pub sig_end: usize,
    /// The comment or docstring as written, and cleaned of its markers.
    pub doc_raw: Option<String>,
    pub doc: Option<String>,
    /// 1-based lines of `span`.
    pub line: usize,
    pub end_line: usize,
    /// Identifiers and type names used inside, first occurrence first.
    pub idents: Vec<String>,
}

/// A class, impl block, trait or receiver type that methods belong to.
#[derive(Debug, Clone, Default)]
pub struct Container {
    pub name: String,
    /// `export class Foo extends Bar`, `impl Display for Foo`, `class Foo(Base):`.
    pub header: String,
    /// Field declarations, one line each.
    pub fields: Vec<String>,
    /// The doc comment of the container, cleaned.
    pub doc: Option<String>,
}

#[derive(Debug, Default)]
pub struct Parsed {
    pub imports: Vec<String>,
    pub items: Vec<Item>,
    pub containers: Vec<Container>,
    /// The licence header's range, if the file starts with one.
    pub licence: Option<Range<usize>>,
    /// Whether tree-sitter had to recover from a syntax error somewhere.
    pub has_errors: bool,
}

/// Node kinds per language.
struct Spec {
    /// Functions or methods with `name` and `body` fields.
    functions: &'static [&'static str],
    /// Declarators binding a function value to a name (`const f = () => …`).
    declarators: &'static [&'static str],
    /// Values of a declarator that make it a function.
    function_values: &'static [&'static str],
    /// Nodes whose body holds methods: (kind, item kind or None when not an item itself).
    containers: &'static [(&'static str, Option<ItemKind>)],
    /// Type declarations that are items but hold no methods.
    types: &'static [(&'static str, ItemKind)],
    comments: &'static [&'static str],
    imports: &'static [&'static str],
    /// Nodes wrapping a declaration (`export`, decorators) whose comment sits above them.
    wrappers: &'static [&'static str],
    /// Nodes that may stand between a comment and what it documents.
    between: &'static [&'static str],
}

const JS_FUNCTION_VALUES: &[&str] = &[
    "arrow_function",
    "function_expression",
    "function",
    "generator_function",
];

const TS: Spec = Spec {
    functions: &[
        "function_declaration",
        "generator_function_declaration",
        "method_definition",
    ],
    declarators: &["variable_declarator"],
    function_values: JS_FUNCTION_VALUES,
    containers: &[
        ("class_declaration", Some(ItemKind::Class)),
        ("abstract_class_declaration", Some(ItemKind::Class)),
    ],
    types: &[
        ("interface_declaration", ItemKind::Interface),
        ("type_alias_declaration", ItemKind::TypeAlias),
        ("enum_declaration", ItemKind::Enum),
    ],
    comments: &["comment"],
    imports: &["import_statement"],
    wrappers: &[
        "export_statement",
        "lexical_declaration",
        "variable_declaration",
    ],
    between: &["decorator"],
};

const JS: Spec = Spec {
    containers: &[("class_declaration", Some(ItemKind::Class))],
    types: &[],
    ..TS
};

const PYTHON: Spec = Spec {
    functions: &["function_definition"],
    declarators: &[],
    function_values: &[],
    containers: &[("class_definition", Some(ItemKind::Class))],
    types: &[],
    comments: &["comment"],
    imports: &[
        "import_statement",
        "import_from_statement",
        "future_import_statement",
    ],
    wrappers: &["decorated_definition"],
    between: &[],
};

const RUST: Spec = Spec {
    functions: &["function_item"],
    declarators: &[],
    function_values: &[],
    containers: &[("impl_item", None), ("trait_item", Some(ItemKind::Trait))],
    types: &[
        ("struct_item", ItemKind::Struct),
        ("enum_item", ItemKind::Enum),
        ("union_item", ItemKind::Struct),
        ("type_item", ItemKind::TypeAlias),
    ],
    comments: &["line_comment", "block_comment"],
    imports: &["use_declaration"],
    wrappers: &[],
    between: &["attribute_item"],
};

const GO: Spec = Spec {
    functions: &["function_declaration", "method_declaration"],
    declarators: &[],
    function_values: &[],
    containers: &[],
    // Type specs are handled by hand: their name is on the spec inside the declaration.
    types: &[],
    comments: &["comment"],
    imports: &["import_declaration"],
    wrappers: &[],
    between: &[],
};

const JAVA: Spec = Spec {
    functions: &["method_declaration", "constructor_declaration"],
    declarators: &[],
    function_values: &[],
    containers: &[
        ("class_declaration", Some(ItemKind::Class)),
        ("interface_declaration", Some(ItemKind::Interface)),
        ("enum_declaration", Some(ItemKind::Enum)),
        ("record_declaration", Some(ItemKind::Class)),
    ],
    types: &[],
    comments: &["line_comment", "block_comment"],
    imports: &["import_declaration"],
    wrappers: &[],
    between: &[],
};

fn spec(lang: Lang) -> &'static Spec {
    match lang {
        Lang::TypeScript | Lang::Tsx => &TS,
        Lang::JavaScript => &JS,
        Lang::Python => &PYTHON,
        Lang::Rust => &RUST,
        Lang::Go => &GO,
        Lang::Java => &JAVA,
    }
}

/// The tree-sitter grammar of a language.
pub fn language(lang: Lang) -> tree_sitter::Language {
    match lang {
        Lang::TypeScript => tree_sitter_typescript::LANGUAGE_TYPESCRIPT.into(),
        Lang::Tsx => tree_sitter_typescript::LANGUAGE_TSX.into(),
        Lang::JavaScript => tree_sitter_javascript::LANGUAGE.into(),
        Lang::Python => tree_sitter_python::LANGUAGE.into(),
        Lang::Rust => tree_sitter_rust::LANGUAGE.into(),
        Lang::Go => tree_sitter_go::LANGUAGE.into(),
        Lang::Java => tree_sitter_java::LANGUAGE.into(),
    }
}

/// Parsers, one per language, made on first use (a parser is per thread).
#[derive(Default)]
pub struct Parsers {
    parsers: Vec<(Lang, Parser)>,
}

impl Parsers {
    /// Parse `text`; `None` when the grammar cannot be loaded or the parse gave up.
    pub fn parse(&mut self, lang: Lang, text: &str) -> Option<Parsed> {
        let i = match self.parsers.iter().position(|(l, _)| *l == lang) {
            Some(i) => i,
            None => {
                let mut p = Parser::new();
                p.set_language(&language(lang)).ok()?;
                self.parsers.push((lang, p));
                self.parsers.len() - 1
            }
        };
        let tree = self.parsers[i].1.parse(text, None)?;
        let root = tree.root_node();
        let mut ex = Extractor {
            text,
            lang,
            spec: spec(lang),
            out: Parsed {
                has_errors: root.has_error(),
                ..Parsed::default()
            },
        };
        ex.out.licence = licence_header(text, root, ex.spec);
        ex.visit(root, None, 0);
        ex.finish_go_containers();
        Some(ex.out)
    }
}

/// Deepest nesting searched for declarations; deeper code (generated expression towers)
/// is not where a repository's functions live.
const MAX_DEPTH: usize = 48;

struct Extractor<'t> {
    text: &'t str,
    lang: Lang,
    spec: &'static Spec,
    out: Parsed,
}

fn is_licence(comment: &str) -> bool {
    let l = comment.to_ascii_lowercase();
    l.contains("copyright")
        || l.contains("spdx-license-identifier")
        || l.contains("@license")
        || l.contains("licensed under")
        || l.contains("license")
        || l.contains("licence")
}

/// The comments at the top of a file that carry a licence or copyright notice.
fn licence_header(text: &str, root: Node, spec: &Spec) -> Option<Range<usize>> {
    let mut end = None;
    for i in 0..root.child_count() {
        let Some(c) = root.child(i) else { break };
        if !spec.comments.contains(&c.kind()) {
            break;
        }
        if is_licence(&text[c.byte_range()]) {
            end = Some(c.end_byte());
        } else if end.is_some() {
            break;
        }
    }
    end.map(|e| 0..e)
}

impl<'t> Extractor<'t> {
    fn node_text(&self, n: Node) -> &'t str {
        &self.text[n.byte_range()]
    }

    fn field_text(&self, n: Node, field: &str) -> Option<&'t str> {
        n.child_by_field_name(field).map(|c| self.node_text(c))
    }

    fn visit(&mut self, node: Node, container: Option<usize>, depth: usize) {
        if depth > MAX_DEPTH {
            return;
        }
        let kind = node.kind();
        if depth == 1 && self.spec.imports.contains(&kind) {
            self.out
                .imports
                .push(self.node_text(node).trim_end().to_string());
        }
        if self.spec.functions.contains(&kind) {
            self.function(node, container);
            return;
        }
        if self.spec.declarators.contains(&kind) {
            if let Some(value) = node.child_by_field_name("value")
                && self.spec.function_values.contains(&value.kind())
            {
                self.arrow(node, value);
            }
            return;
        }
        if let Some(&(_, item_kind)) = self.spec.containers.iter().find(|(k, _)| *k == kind) {
            let idx = self.container(node, item_kind);
            if let Some(body) = node.child_by_field_name("body") {
                self.visit_children(body, Some(idx), depth + 1);
            }
            return;
        }
        if let Some(&(_, item_kind)) = self.spec.types.iter().find(|(k, _)| *k == kind) {
            if let Some(name) = self.field_text(node, "name") {
                self.push_item(node, item_kind, name.to_string(), None, None);
            }
            return;
        }
        if self.lang == Lang::Go && kind == "type_declaration" {
            self.go_types(node);
            return;
        }
        self.visit_children(node, container, depth + 1);
    }

    fn visit_children(&mut self, node: Node, container: Option<usize>, depth: usize) {
        let mut cursor = node.walk();
        let children: Vec<Node> = node.named_children(&mut cursor).collect();
        for c in children {
            self.visit(c, container, depth);
        }
    }

    /// The node a comment documents: the declaration with its `export`/decorator wrappers.
    fn outer<'a>(&self, node: Node<'a>) -> Node<'a> {
        let mut n = node;
        while let Some(p) = n.parent() {
            if self.spec.wrappers.contains(&p.kind()) {
                n = p;
            } else {
                break;
            }
        }
        n
    }

    /// The comment block right above `outer`: consecutive comments, each ending on the line
    /// before the next, skipping attributes/decorators; licence comments do not count.
    fn leading_comment(&self, outer: Node) -> Option<String> {
        let mut parts: Vec<&str> = Vec::new();
        let mut next_row = outer.start_position().row;
        let mut cur = outer.prev_sibling();
        while let Some(c) = cur {
            let k = c.kind();
            if self.spec.between.contains(&k) {
                next_row = c.start_position().row;
                cur = c.prev_sibling();
                continue;
            }
            if !self.spec.comments.contains(&k) || c.end_position().row + 1 < next_row {
                break;
            }
            let t = self.node_text(c);
            if is_licence(t)
                && self
                    .out
                    .licence
                    .as_ref()
                    .is_some_and(|l| c.end_byte() <= l.end)
            {
                break;
            }
            parts.push(t.trim_end());
            next_row = c.start_position().row;
            cur = c.prev_sibling();
        }
        if parts.is_empty() {
            return None;
        }
        parts.reverse();
        Some(parts.join("\n"))
    }

    fn container(&mut self, node: Node, item_kind: Option<ItemKind>) -> usize {
        let name = match node.kind() {
            "impl_item" => self
                .field_text(node, "type")
                .map(|t| t.split('<').next().unwrap_or(t).trim().to_string()),
            _ => self.field_text(node, "name").map(str::to_string),
        }
        .unwrap_or_default();
        let body = node.child_by_field_name("body");
        let outer = self.outer(node);
        let header_end = body.map_or(node.end_byte(), |b| b.start_byte());
        let header = self.text[outer.start_byte()..header_end]
            .trim_end()
            .to_string();
        let mut fields = Vec::new();
        if let Some(body) = body {
            let mut cursor = body.walk();
            for c in body.named_children(&mut cursor) {
                let k = c.kind();
                let is_member = self.spec.functions.contains(&k)
                    || self.spec.comments.contains(&k)
                    || self.spec.between.contains(&k)
                    || self.spec.wrappers.contains(&k)
                    || self.spec.containers.iter().any(|(ck, _)| *ck == k);
                let t = self.node_text(c).trim();
                if !is_member && !t.contains('\n') && t.len() <= 160 {
                    fields.push(t.to_string());
                }
            }
        }
        let doc = self.leading_comment(outer).map(|c| clean_comment(&c));
        let idx = self.out.containers.len();
        self.out.containers.push(Container {
            name: name.clone(),
            header,
            fields,
            doc,
        });
        if let Some(k) = item_kind
            && !name.is_empty()
        {
            self.push_item(node, k, name, None, None);
        }
        idx
    }

    fn function(&mut self, node: Node, container: Option<usize>) {
        let Some(name) = self.field_text(node, "name") else {
            return;
        };
        let Some(body) = node.child_by_field_name("body") else {
            return; // a declaration without a body (overload, abstract, trait method)
        };
        let (kind, container) = if self.lang == Lang::Go && node.kind() == "method_declaration" {
            let recv = node
                .child_by_field_name("receiver")
                .and_then(|r| first_of_kind(r, "type_identifier"))
                .map(|t| self.node_text(t).to_string())
                .unwrap_or_default();
            (ItemKind::Method, Some(self.container_named(&recv)))
        } else if container.is_some() {
            (ItemKind::Method, container)
        } else {
            (ItemKind::Function, None)
        };
        self.push_item(node, kind, name.to_string(), container, Some(body));
    }

    fn arrow(&mut self, declarator: Node, value: Node) {
        let Some(name) = declarator.child_by_field_name("name") else {
            return;
        };
        if name.kind() != "identifier" {
            return; // destructuring
        }
        let Some(body) = value.child_by_field_name("body") else {
            return;
        };
        let name = self.node_text(name).to_string();
        self.push_item(declarator, ItemKind::Arrow, name, None, Some(body));
    }

    fn go_types(&mut self, decl: Node) {
        let mut cursor = decl.walk();
        let specs: Vec<Node> = decl
            .named_children(&mut cursor)
            .filter(|c| c.kind() == "type_spec" || c.kind() == "type_alias")
            .collect();
        for s in specs {
            let Some(name) = self.field_text(s, "name") else {
                continue;
            };
            let kind = match s.child_by_field_name("type").map(|t| t.kind()) {
                Some("struct_type") => ItemKind::Struct,
                Some("interface_type") => ItemKind::Interface,
                _ => ItemKind::TypeAlias,
            };
            let node = if specs_len(decl) == 1 { decl } else { s };
            self.push_item(node, kind, name.to_string(), None, None);
        }
    }

    /// A Go receiver type's container, made on first use; its header is filled in from the
    /// type's declaration once the whole file is read.
    fn container_named(&mut self, name: &str) -> usize {
        if let Some(i) = self.out.containers.iter().position(|c| c.name == name) {
            return i;
        }
        self.out.containers.push(Container {
            name: name.to_string(),
            header: format!("type {name}"),
            ..Container::default()
        });
        self.out.containers.len() - 1
    }

    fn finish_go_containers(&mut self) {
        if self.lang != Lang::Go {
            return;
        }
        for c in &mut self.out.containers {
            if let Some(item) = self
                .out
                .items
                .iter()
                .find(|i| !i.kind.is_callable() && i.name == c.name)
            {
                let t = &self.text[item.span.clone()];
                if t.len() <= 800 {
                    c.header = t.to_string();
                }
                c.doc = item.doc.clone();
            }
        }
    }

    fn push_item(
        &mut self,
        node: Node,
        kind: ItemKind,
        name: String,
        container: Option<usize>,
        body: Option<Node>,
    ) {
        let outer = self.outer(node);
        let mut doc_raw = self.leading_comment(outer);
        let mut body_range = body.map(|b| b.byte_range());
        // A docstring (Python): the first statement of the body, a string.
        if self.lang == Lang::Python
            && let Some(b) = body.or_else(|| node.child_by_field_name("body"))
            && let Some(first) = b.named_child(0)
            && first.kind() == "expression_statement"
            && first.named_child(0).is_some_and(|s| s.kind() == "string")
        {
            doc_raw = Some(self.node_text(first).to_string());
            if let Some(r) = &mut body_range {
                match b.named_child(1) {
                    Some(next) => r.start = line_start(self.text, next.start_byte()),
                    None => r.start = r.end, // docstring only
                }
            }
        } else if self.lang == Lang::Python
            && let Some(r) = &mut body_range
        {
            r.start = line_start(self.text, r.start);
        }
        let doc = doc_raw
            .as_deref()
            .map(clean_comment)
            .filter(|d| !d.is_empty());
        let mut idents = identifiers(self.text, node);
        if let Some(c) = container {
            // A method uses its own type (`this`, `self`, `Self`).
            let own = &self.out.containers[c].name;
            idents.retain(|i| i != own);
            idents.insert(0, own.clone());
        }
        let sig_end = body.map_or(outer.end_byte(), |b| b.start_byte());
        self.out.items.push(Item {
            kind,
            name,
            container,
            span: outer.byte_range(),
            body: body_range,
            sig_end,
            doc_raw: doc.as_ref().and(doc_raw),
            doc,
            line: outer.start_position().row + 1,
            end_line: outer.end_position().row + 1,
            idents,
        });
    }
}

fn specs_len(decl: Node) -> usize {
    let mut cursor = decl.walk();
    decl.named_children(&mut cursor)
        .filter(|c| c.kind() == "type_spec" || c.kind() == "type_alias")
        .count()
}

fn first_of_kind<'a>(node: Node<'a>, kind: &str) -> Option<Node<'a>> {
    let mut cursor = node.walk();
    let mut stack = vec![node];
    while let Some(n) = stack.pop() {
        if n.kind() == kind {
            return Some(n);
        }
        let children: Vec<Node> = n.named_children(&mut cursor).collect();
        stack.extend(children.into_iter().rev());
    }
    None
}

fn line_start(text: &str, at: usize) -> usize {
    text[..at].rfind('\n').map_or(0, |i| i + 1)
}

/// Identifier and type names under `node`, first occurrence first, at most 256.
fn identifiers(text: &str, node: Node) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut cursor = node.walk();
    // Iterative pre-order walk: deep expressions cannot overflow the stack.
    'walk: loop {
        let n = cursor.node();
        let k = n.kind();
        if (k == "identifier" || k == "type_identifier")
            && let Some(t) = text.get(n.byte_range())
            && seen.insert(t)
        {
            out.push(t.to_string());
            if out.len() == 256 {
                break;
            }
        }
        if cursor.goto_first_child() {
            continue;
        }
        loop {
            if cursor.goto_next_sibling() {
                continue 'walk;
            }
            if !cursor.goto_parent() || cursor.node() == node {
                break 'walk;
            }
        }
    }
    out
}

/// A comment or docstring without its markers: `/** * */`, `//`, `///`, `#`, quotes.
pub fn clean_comment(raw: &str) -> String {
    let mut lines: Vec<String> = Vec::new();
    for line in raw.lines() {
        let mut l = line.trim();
        for prefix in ["/**", "/*!", "/*", "//!", "///", "//", "\"\"\"", "'''", "#"] {
            if let Some(rest) = l.strip_prefix(prefix) {
                l = rest;
                break;
            }
        }
        for suffix in ["*/", "\"\"\"", "'''"] {
            if let Some(rest) = l.strip_suffix(suffix) {
                l = rest;
                break;
            }
        }
        let l = l.trim_start();
        let l = l
            .strip_prefix("* ")
            .unwrap_or(if l == "*" { "" } else { l });
        lines.push(l.trim_end().to_string());
    }
    // Python docstrings may carry a string prefix (r, u).
    if let Some(first) = lines.first_mut()
        && (first.starts_with("r\"\"\"") || first.starts_with("u\"\"\""))
    {
        first.replace_range(..4, "");
    }
    while lines.first().is_some_and(|l| l.is_empty()) {
        lines.remove(0);
    }
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines.join("\n")
}
